"""ControlNet overhead: one sampler step (a CFG denoiser call: positive and negative in one
batched UNet forward) with one ControlNet and without, on a full-size SD 1.5 UNet and a
full-size SD 1.5 ControlNet with random weights, 64×64 latents (512² pixels), float32, CPU.

    python bench/controlnet_overhead.py [--repeats 5] [--threads N]

A ControlNet is the UNet's encoder half plus a hint encoder, so expect about 1.3–1.5× the
step time. Reports the best of N for each, alternating, and the ratio. Needs ~6 GiB of RAM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build():
    from nodeflow.models.controlnet import ControlHint, ControlModel, ControlNet
    from nodeflow.models.diffusion import DiffusionModel
    from nodeflow.models.testing import random_tensors
    from nodeflow.models.unet import UNet, UNetConfig

    cfg = UNetConfig()                                               # SD 1.5: 320, (1, 2, 4, 4), context 768

    def random(module):
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        module.load_state_dict(random_tensors(shapes, seed=0))
        return module.eval().requires_grad_(False)

    with torch.device("meta"):
        unet, net = UNet(cfg), ControlNet(cfg, 3)
    unet, net = random(unet.to_empty(device="cpu")), random(net.to_empty(device="cpu"))
    model = DiffusionModel(unet, family="sd1", device=torch.device("cpu"))
    hint = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    control = ControlHint(ControlModel(net, "control_sd15_random.safetensors", device="cpu"), hint, 1.0)
    return model, control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nodeflow.sampling import CFGDenoiser, DiscreteSchedule

    model, control = build()
    schedule = DiscreteSchedule.from_model(model)
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    shape = (1, 4, 64, 64)
    plain = CFGDenoiser(model, schedule, [[pos, {}]], [[neg, {}]], 7.0, shape, "cpu")
    controlled = CFGDenoiser(model, schedule, [[pos, {"control": control}]], [[neg, {"control": control}]], 7.0,
                             shape, "cpu")
    x = torch.randn(shape, generator=g) * 14.6
    sigma = schedule.sigmas[-1].reshape(1)

    def timed(denoiser) -> float:
        start = time.perf_counter()
        denoiser(x, sigma)
        return time.perf_counter() - start

    timed(plain), timed(controlled)                                  # warm-up (hint resize, allocator)
    times = {"without": [], "with ControlNet": []}
    for _ in range(args.repeats):
        times["without"].append(timed(plain))
        times["with ControlNet"].append(timed(controlled))
    best = {k: min(v) for k, v in times.items()}
    result = {"step_seconds": best, "ratio": best["with ControlNet"] / best["without"],
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "unet_params_M": round(sum(p.numel() for p in model.unet.parameters()) / 1e6),
              "controlnet_params_M": round(sum(p.numel() for p in control.model.net.parameters()) / 1e6)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
