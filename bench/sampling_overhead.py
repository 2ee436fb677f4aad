"""Sampling overhead: time spent in nodeflow.sampling outside the model, per step.

Runs the full KSampler path (schedule, noise, CFG batching at cfg 7, the sampler's maths,
callbacks) with a dummy model whose ``apply_model`` returns a constant prediction; the time
inside ``apply_model`` is measured and subtracted. Target: under 1 ms per step on a 64×64
latent (a 512×512 image).

    python bench/sampling_overhead.py [--steps 20] [--size 64] [--batch 1] [--repeat 3] [--threads N]
                                      [--samplers euler,dpmpp_2m] [--tree comfy|torchsde|builtin]
                                      [--clock wall|cpu] [--json out.json]

``--clock cpu`` counts this process's CPU time instead of wall time: steadier on a shared,
loaded machine (use it with ``--threads 1``, or idle intra-op threads' spinning counts too).

``--tree`` picks the Brownian tree of the SDE samplers: ``comfy`` (the default: ComfyUI's
torchsde tree computed by nodeflow), ``torchsde`` (torchsde's own object: the same numbers)
or ``builtin`` (same law, other numbers).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeflow.sampling import SAMPLER_NAMES, ksampler
from nodeflow.sampling import steps as sampler_steps
from nodeflow.sampling.model_sampling import scaled_linear_alphas_cumprod
from nodeflow.sampling.noise import BrownianTreeNoiseSampler


class DummyModel:
    """The DiffusionModel contract with a free network: ε̂ = 0.1·x. Times its own calls."""

    prediction_type = "eps"
    in_channels = 4
    latent_channels = 4
    device = "cpu"

    clock = staticmethod(time.perf_counter)

    def __init__(self):
        self.alphas_cumprod = scaled_linear_alphas_cumprod().float()
        self.model_seconds = 0.0
        self.calls = 0

    def process_latent_in(self, x):
        return x * 0.18215

    def process_latent_out(self, x):
        return x / 0.18215

    def condition_kwargs(self, meta, batch, width, height):
        return {}

    def apply_model(self, x, t, context, y=None, c_concat=None):
        start = self.clock()
        out = x * 0.1
        self.model_seconds += self.clock() - start
        self.calls += 1
        return out


def measure(name: str, steps: int, size: int, batch: int, repeat: int) -> dict:
    best = None
    for _ in range(repeat):
        model = DummyModel()
        latent = {"samples": torch.zeros(batch, 4, size, size)}
        positive = [[torch.randn(1, 77, 768), {}]]
        negative = [[torch.zeros(1, 77, 768), {}]]
        done = []
        start = DummyModel.clock()
        ksampler(model, latent, positive, negative, seed=1, steps=steps, cfg=7.0, sampler_name=name,
                 scheduler="karras", callback=lambda s, t, x, d, done=done: done.append(s))
        total = DummyModel.clock() - start
        outside = total - model.model_seconds
        result = {"sampler": name, "steps": steps, "model_calls": model.calls, "total_ms": total * 1e3,
                  "outside_ms": outside * 1e3, "outside_ms_per_step": outside * 1e3 / steps}
        if best is None or result["outside_ms"] < best["outside_ms"]:
            best = result
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="runs per sampler; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--samplers", default=",".join(SAMPLER_NAMES))
    parser.add_argument("--tree", choices=["comfy", "torchsde", "builtin"], default="comfy",
                        help="the SDE samplers' Brownian tree")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (steadier on a loaded machine)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.clock == "cpu":
        DummyModel.clock = staticmethod(time.process_time)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_torchsde = {"comfy": None, "torchsde": True, "builtin": False}[args.tree]
    sampler_steps.BrownianTreeNoiseSampler = functools.partial(BrownianTreeNoiseSampler, use_torchsde=use_torchsde)
    names = [n for n in args.samplers.split(",") if n]
    measure(names[0], 2, args.size, args.batch, 1)        # warm-up
    rows = [measure(n, args.steps, args.size, args.batch, args.repeat) for n in names]
    print(f"latent {args.batch}x4x{args.size}x{args.size}, {args.steps} steps, cfg 7, karras, "
          f"{torch.get_num_threads()} thread(s), Brownian tree: {args.tree}, {args.clock} clock")
    print(f"{'sampler':32s} {'calls':>5s} {'total ms':>9s} {'outside ms':>10s} {'ms/step':>8s}")
    for r in rows:
        flag = "" if r["outside_ms_per_step"] < 1.0 else "  > 1 ms"
        print(f"{r['sampler']:32s} {r['model_calls']:5d} {r['total_ms']:9.1f} {r['outside_ms']:10.1f} "
              f"{r['outside_ms_per_step']:8.3f}{flag}")
    worst = max(rows, key=lambda r: r["outside_ms_per_step"])
    print(f"worst: {worst['sampler']} {worst['outside_ms_per_step']:.3f} ms/step")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
