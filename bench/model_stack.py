"""Model-stack benchmark: a full-size SD 1.5 with random weights, nodeflow vs diffusers.

    python bench/model_stack.py [--workdir /tmp/nodeflow-bench] [--repeats 3] [--vae-repeats 2]

1. Builds SD 1.5's architecture with random weights (UNet 860M, VAE 84M, CLIP-L 123M
   parameters, float32) and writes it twice: one LDM single-file ``.safetensors`` (what
   users download) and a diffusers folder with the same numbers.
2. Load: ``load_checkpoint(file)`` vs diffusers' ``from_pretrained`` (UNet, VAE) and
   transformers' ``CLIPTextModel.from_pretrained``, each in a fresh process: wall time and
   peak RSS (also relative to the file size).
3. Speed, one process holding both: one UNet forward at 64x64 latents, batch 2 (one CFG
   step), and one VAE decode to 512x512, alternating ours / diffusers, best of N.
   Outputs are compared too (same weights, same inputs).

Everything runs on the CPU in float32; the numbers are for the machine it runs on.
Needs ~12 GiB of RAM and ~9 GB of disk in the work directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIP_L = {"width": 768, "layers": 12, "intermediate": 3072}


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- 1. a random full-size SD 1.5 ------------------------------------------------------------

def prepare(workdir: Path) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    from nodeflow.models.diffusers_format import (
        diffusers_unet_config,
        diffusers_vae_config,
        ldm_unet_to_diffusers,
        ldm_vae_to_diffusers,
    )
    from nodeflow.models.testing import clip_l_shapes, random_tensors
    from nodeflow.models.unet import UNet, UNetConfig
    from nodeflow.models.vae import AutoencoderKL, VAEConfig

    def shapes(module_fn):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in module_fn().state_dict().items()}

    workdir.mkdir(parents=True, exist_ok=True)
    unet = random_tensors(shapes(lambda: UNet(UNetConfig())), seed=0)
    vae = random_tensors(shapes(lambda: AutoencoderKL(VAEConfig())), seed=1)
    clip = random_tensors(clip_l_shapes(**CLIP_L), seed=2)
    single = {**{"model.diffusion_model." + k: v for k, v in unet.items()},
              **{"first_stage_model." + k: v for k, v in vae.items()},
              **{"cond_stage_model.transformer." + k: v for k, v in clip.items()}}
    save_file(single, str(workdir / "sd15.safetensors"))
    del single

    folder = workdir / "sd15-diffusers"

    def write(sub, config, tensors, name):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(config, indent=1))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / sub / name))

    weights = "diffusion_pytorch_model.safetensors"
    write("unet", diffusers_unet_config(UNetConfig()), ldm_unet_to_diffusers(unet), weights)
    write("vae", diffusers_vae_config(VAEConfig()), ldm_vae_to_diffusers(vae), weights)
    text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=49406, eos_token_id=49407)
    write("text_encoder", {**text.to_dict(), "architectures": ["CLIPTextModel"]}, clip, "model.safetensors")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


# --- 2. load time and peak memory (each in a fresh process) ---------------------------------

def touch(modules) -> None:
    """Read one number per memory page of every weight: both sides map the file lazily, so this is
    where the weights are actually read."""
    for module in modules:
        for p in module.parameters():
            p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].float().sum()


def child_load(which: str, workdir: Path) -> dict:
    from transformers import CLIPTextModel
    if which == "ours":
        from nodeflow.models import load_checkpoint
        base = current_rss()
        t0 = time.perf_counter()
        ckpt = load_checkpoint(workdir / "sd15.safetensors", device="cpu")
        seconds = time.perf_counter() - t0
        assert ckpt.family == "sd1"
        modules = [ckpt.model.unet, ckpt.vae.model, *(t.model for t in ckpt.clip.towers)]
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        folder = workdir / "sd15-diffusers"
        base = current_rss()
        t0 = time.perf_counter()
        modules = [UNet2DConditionModel.from_pretrained(folder / "unet"),
                   AutoencoderKL.from_pretrained(folder / "vae"),
                   CLIPTextModel.from_pretrained(folder / "text_encoder")]
        seconds = time.perf_counter() - t0
    touch(modules)
    ready = time.perf_counter() - t0
    return {"seconds": seconds, "ready_seconds": ready, "peak_rss": peak_rss(), "rss_before": base}


# --- 3. speed -------------------------------------------------------------------------------

def child_speed(workdir: Path, repeats: int, vae_repeats: int) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from nodeflow.models import load_checkpoint

    ckpt = load_checkpoint(workdir / "sd15.safetensors", device="cpu", components=("model", "vae"))
    folder = workdir / "sd15-diffusers"
    d_unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    d_vae = AutoencoderKL.from_pretrained(folder / "vae").eval()

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 64, 64, generator=g), torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, generator=g) * 0.5
    z = torch.randn(1, 4, 64, 64, generator=g)

    def ours_unet():
        return ckpt.model.apply_model(x, t, context)

    def theirs_unet():
        with torch.no_grad():
            return d_unet(x, t, context).sample

    def ours_vae():
        return ckpt.vae.decode(z)

    def theirs_vae():
        with torch.no_grad():
            return ((d_vae.decode(z).sample + 1) / 2).clamp(0, 1).movedim(1, -1)

    result = {"threads": torch.get_num_threads()}
    for name, ours, theirs, n in (("unet", ours_unet, theirs_unet, repeats),
                                  ("vae_decode", ours_vae, theirs_vae, vae_repeats)):
        times, outputs = {"ours": [], "diffusers": []}, {}
        for r in range(n + 1):                                   # round 0 warms up; the order alternates
            order = [("ours", ours), ("diffusers", theirs)]
            for label, fn in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                outputs[label] = fn()
                seconds = time.perf_counter() - t0
                if r:
                    times[label].append(seconds)
                print(f"  {name} {label} round {r}: {seconds:.2f} s", file=sys.stderr, flush=True)
        result[name] = {"ours_s": min(times["ours"]), "diffusers_s": min(times["diffusers"]),
                        "ours_all": times["ours"], "diffusers_all": times["diffusers"],
                        "ratio": min(times["ours"]) / min(times["diffusers"]),
                        "max_abs_diff": (outputs["ours"] - outputs["diffusers"]).abs().max().item(),
                        "output_scale": outputs["diffusers"].abs().max().item()}
    return result


# --- driver ---------------------------------------------------------------------------------

def run_child(workdir: Path, *args: str) -> dict:
    """Run this script's ``--child`` step in a fresh process (its own peak RSS); stderr passes through."""
    out = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--child", *args], check=True,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/nodeflow-bench"))
    p.add_argument("--repeats", type=int, default=3, help="timed UNet forwards per side (after one warm-up)")
    p.add_argument("--vae-repeats", type=int, default=2, help="timed VAE decodes per side (after one warm-up)")
    p.add_argument("--load-repeats", type=int, default=3, help="load measurements per side (best is kept)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        kind = args.child[0]
        if kind == "prepare":
            prepare(args.workdir)
            result = {}
        elif kind == "load":
            result = child_load(args.child[1], args.workdir)
        else:
            result = child_speed(args.workdir, args.repeats, args.vae_repeats)
        print(json.dumps(result))
        return

    file = args.workdir / "sd15.safetensors"
    if not file.exists() or not (args.workdir / "sd15-diffusers" / "model_index.json").exists():
        print(f"building a random SD 1.5 in {args.workdir} ...", flush=True)
        run_child(args.workdir, "prepare")
    size = file.stat().st_size
    print(f"checkpoint: {file} ({size / 2**30:.2f} GiB, float32)")

    runs = {"ours": [], "diffusers": []}
    for _ in range(args.load_repeats):                                   # alternating, fresh processes
        for which in runs:
            runs[which].append(run_child(args.workdir, "load", which))
    loads = {which: {key: min(r[key] for r in rs) for key in rs[0]} for which, rs in runs.items()}   # best of each
    for which, r in loads.items():
        print(f"load {which:9s}: {r['seconds']:6.2f} s, {r['ready_seconds']:6.2f} s with every weight read;  "
              f"peak RSS {r['peak_rss'] / 2**30:5.2f} GiB = {r['peak_rss'] / size:.2f}x the file "
              f"({(r['peak_rss'] - r['rss_before']) / size:.2f}x counting only what loading added)")
    ours, theirs = loads["ours"], loads["diffusers"]
    print(f"load ratio ours/diffusers: call {ours['seconds'] / theirs['seconds']:.2f}, "
          f"ready {ours['ready_seconds'] / theirs['ready_seconds']:.2f}, "
          f"peak RSS {ours['peak_rss'] / theirs['peak_rss']:.2f}")

    s = run_child(args.workdir, "speed", "--repeats", str(args.repeats), "--vae-repeats", str(args.vae_repeats))
    for name, label in (("unet", "UNet forward, 64x64 latent, batch 2"), ("vae_decode", "VAE decode to 512x512")):
        r = s[name]
        print(f"{label}: ours {r['ours_s']:.2f} s, diffusers {r['diffusers_s']:.2f} s, ratio {r['ratio']:.3f} "
              f"(best of {len(r['ours_all'])}; max |diff| {r['max_abs_diff']:.2e} at scale {r['output_scale']:.2f})")
    summary = {"file_bytes": size, "load": loads, "load_runs": runs, "speed": s, "torch_threads": s["threads"],
               "torch": torch.__version__}
    (args.workdir / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"results: {args.workdir / 'results.json'}")


if __name__ == "__main__":
    main()
