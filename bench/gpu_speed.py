"""Speed of the model path: eager vs compiled vs compiled + CUDA graphs, full-size models with
random weights.

    python bench/gpu_speed.py                              # a CUDA machine: SD 1.5 at 512², SDXL at 1024², fp16
    python bench/gpu_speed.py --device cpu                 # the CPU: SD 1.5 at 256², fp32
    python bench/gpu_speed.py --device cpu --models sd15 --size 256 --threads 2 --repeats 3

For each model (real architecture and size, random weights; batch 1 image, so the UNet runs on
the CFG batch of 2 as a sampler step does):

- it/s: sampler steps per second, one step being ``DiffusionModel.apply_model`` on the batch
  (the path the samplers call: manager, casts, the fast path), timed over ``--steps`` steps
  after warm-up, best of ``--repeats`` (the slowest is printed too, and all go to the JSON);
- VAE decode ms: ``VAE.decode`` of one latent to pixels (the node's path, to CPU float32);
- first call s: the first step (or decode) of a variant, which compiles (and captures);
- peak VRAM: the allocator's peak while the variant ran (weights included).

On a GPU machine whose commands are limited (10 minutes each), run it in parts, each with its
own ``--json`` (SD 1.5 takes a few minutes, mostly the cold compile; SDXL's compile takes longer):

    python bench/gpu_speed.py --models sd15 --json $OUT/sd15.json
    python bench/gpu_speed.py --models sdxl --variants eager,eager_cl,deepcache --json $OUT/sdxl-eager.json
    python bench/gpu_speed.py --models sdxl --variants compiled,graphs --json $OUT/sdxl-compiled.json

Variants: ``eager`` (today's default), ``eager_cl`` (eager, channels-last), ``compiled``
(inductor in ``--compile``'s layout: channels-last on CUDA; on the CPU the UNet contiguous and
the VAE decoder channels-last, as measured best), ``compiled_cl`` / ``compiled_cf`` (inductor,
all channels-last / all contiguous), ``graphs`` (``--compile --cuda-graphs``), ``deepcache`` /
``compiled_deepcache`` (the DeepCache node, eager / compiled: timed over whole cycles of
``--deepcache INTERVAL,DEPTH``, one full step and interval − 1 cached ones), ``streamed`` /
``streamed_sync`` (CUDA: every model run layer by layer from pinned CPU memory, as for a model too
large for its GPU: the copies made ahead on a side stream / each layer copied when reached; at
most 5 steps). Each variant gets
freshly built weights and a run context of its own. Inductor's caches go to a fresh folder, so
the first compiled variant's first call is a cold compile; later variants of the same run find
inductor's in-process caches warm (``--keep-cache`` to reuse ``$TORCHINDUCTOR_CACHE_DIR``).
Results also go to ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodeflow import context  # noqa: E402
from nodeflow.models import compiled, devices, streaming  # noqa: E402
from nodeflow.models.diffusion import DiffusionModel  # noqa: E402
from nodeflow.models.step_cache import DeepCache  # noqa: E402
from nodeflow.models.unet import UNet, UNetConfig  # noqa: E402
from nodeflow.models.vae import VAE, AutoencoderKL, VAEConfig  # noqa: E402

MODELS = {
    # SD 1.5: 860M UNet, CLIP-L context (77 × 768)
    "sd15": {"unet": UNetConfig(), "family": "sd1", "context": 768, "size": 512, "params": 859_520_964},
    # SDXL base: 2.6B UNet, CLIP-L ⊕ bigG context (77 × 2048), y = pooled text ⊕ 6 size embeddings (2816)
    "sdxl": {"unet": UNetConfig(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                                transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_middle=10,
                                transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0), context_dim=2048,
                                use_linear_in_transformer=True, adm_in_channels=2816, num_head_channels=64),
             "family": "sdxl", "context": 2048, "size": 1024, "params": 2_567_463_684},
}
VARIANTS = {
    "eager": None,                                                              # no options: as today
    "eager_cl": compiled.CompileOptions(backend=None, channels_last=True),
    "compiled": compiled.CompileOptions(),                                      # what --compile does
    "compiled_cl": compiled.CompileOptions(channels_last=True),
    "compiled_cf": compiled.CompileOptions(channels_last=False),
    "graphs": compiled.CompileOptions(cuda_graphs=True),                        # --compile --cuda-graphs
    "deepcache": None,                                  # eager through the DeepCache node (--deepcache)
    "compiled_deepcache": compiled.CompileOptions(),    # --compile and DeepCache
    "streamed": None,                                   # eager, layer by layer, copies ahead (CUDA)
    "streamed_sync": None,                              # eager, layer by layer, copies when reached (CUDA)
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, device: torch.device, dtype: torch.dtype) -> tuple[DiffusionModel, VAE]:
    """The model with random weights, made directly on ``device`` (fast for SDXL's 2.6B)."""
    spec = MODELS[name]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet(spec["unet"]).to(dtype).eval().requires_grad_(False)
        autoencoder = AutoencoderKL(VAEConfig()).to(dtype).eval().requires_grad_(False)
    count = sum(p.numel() for p in unet.parameters())
    if count != spec["params"]:                     # the released model's UNet, or the figures mean nothing
        raise SystemExit(f"{name}: the UNet has {count:,} parameters, the released model's has {spec['params']:,}")
    model = DiffusionModel(unet, family=spec["family"], device=device)
    return model, VAE(autoencoder, device=device, dtype=dtype)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step, device: torch.device, steps: int, repeats: int, warmup: int) -> tuple[float, list[float]]:
    """(first call s, seconds per step of each repeat) of ``step()``."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return first, times


def time_decode(vae: VAE, latent: torch.Tensor, repeats: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    vae.decode(latent)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        vae.decode(latent)                                      # returns on the CPU: synchronised
        times.append(time.perf_counter() - t0)
    return first, times


def run_model(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    spec = MODELS[name]
    size = args.size or spec["size"]
    g = torch.Generator().manual_seed(1)
    h = w = size // 8
    x = torch.randn(2, 4, h, w, generator=g).to(device)          # the CFG batch of one image
    t = torch.full((2,), 500.0, device=device)
    cond = (torch.randn(2, 77, spec["context"], generator=g) * 0.5).to(device)
    adm = spec["unet"].adm_in_channels
    y = torch.randn(2, adm, generator=g).to(device) if adm else None
    latent = torch.randn(1, 4, h, w, generator=g)
    results = {"size": size, "latent": [h, w], "dtype": str(dtype).replace("torch.", ""), "variants": {}}
    print(f"\n{name} at {size}x{size} ({results['dtype']}, {device}; UNet batch 2 = one CFG step)", flush=True)
    for variant in args.variants:
        options = VARIANTS[variant]
        streamed = variant.startswith("streamed")
        if ((options is not None and options.cuda_graphs) or streamed) and device.type != "cuda":
            continue
        model, vae = build(name, device, dtype)                 # fresh weights: no layout left by another variant
        results["unet_params"] = sum(p.numel() for p in model.unet.parameters())
        handle = model if options is None else compiled.compile_model(model, options)
        steps = args.steps
        if "deepcache" in variant:                          # whole cycles: one full step, interval - 1 cached
            handle = handle.clone()
            handle.model_patches.step_cache = DeepCache(args.deepcache[0], args.deepcache[1])
            steps = -(-steps // args.deepcache[0]) * args.deepcache[0]
        if options is not None:
            vae.compile_options = compiled.CompileOptions(backend=options.backend, channels_last=options.channels_last)
        run = context.RunContext(device=str(device), name=variant)
        if streamed:                                        # nothing fits: each model streams from pinned memory
            run.state("model_manager", lambda: devices.ModelManager(reserve=1 << 60))
            steps = min(steps, 5)
            for module in (model.unet, vae.model):          # built on the GPU (fast); waiting in pinned memory
                devices._move_to_pinned(module)
            torch.cuda.empty_cache()
        copies_for = streaming.copies_for
        if variant == "streamed_sync":
            streaming.copies_for = streaming.Copies
        reset_peak(device)
        try:
            with context.activate(run):
                first, step = time_steps(lambda h=handle: h.apply_model(x, t, cond, y=y), device, steps,
                                         args.repeats, args.warmup)
                decode_first, decode = time_decode(vae, latent, args.vae_repeats)
            vae_dtype = str(vae.dtype).replace("torch.", "")      # fp32 if half precision overflowed
        except Exception as exc:  # noqa: BLE001 - a variant that fails is reported, the others still run
            print(f"  {variant:12s} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
            results["variants"][variant] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        finally:
            streaming.copies_for = copies_for
            del model, vae, handle, run                     # the context's manager and caches hold the models
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = {"it_s": 1 / min(step), "step_ms": min(step) * 1e3, "step_ms_all": [s * 1e3 for s in step],
               "first_call_s": first, "vae_decode_ms": min(decode) * 1e3,
               "vae_decode_ms_all": [s * 1e3 for s in decode], "vae_first_call_s": decode_first,
               "vae_dtype": vae_dtype, "peak_vram_bytes": peak_memory(device)}
        results["variants"][variant] = row
        vram = f", peak VRAM {row['peak_vram_bytes'] / 2**30:.2f} GiB" if row["peak_vram_bytes"] else ""
        print(f"  {variant:12s} {row['it_s']:8.2f} it/s ({row['step_ms']:8.1f} ms/step, max {max(step) * 1e3:8.1f}; "
              f"first call {first:6.1f} s)   VAE decode {row['vae_decode_ms']:8.1f} ms (max {max(decode) * 1e3:8.1f}; "
              f"{vae_dtype}, first {decode_first:6.1f} s){vram}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None, help="comma-separated: sd15, sdxl (default: both on CUDA, sd15 on CPU)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: 512 SD 1.5, 1024 SDXL; "
                   "256 on the CPU)")
    p.add_argument("--variants", default=None, help=f"comma-separated among {', '.join(VARIANTS)}")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per timing (default 20 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None, help="steps after the first, untimed (default 5 CUDA, 1 CPU)")
    p.add_argument("--vae-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--deepcache", default="3,3", metavar="INTERVAL,DEPTH",
                   help="the deepcache variants' settings (default 3,3); their steps are whole cycles")
    p.add_argument("--keep-cache", action="store_true", help="reuse inductor's cache (first calls not cold)")
    p.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "nodeflow-gpu-speed.json")
    args = p.parse_args()

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.keep_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nodeflow-inductor-")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or
                                                                                     ("fp32" if cpu else "fp16")]
    args.models = (args.models or ("sd15" if cpu else "sd15,sdxl")).split(",")
    args.variants = (args.variants or ("eager,eager_cl,compiled,compiled_cl,deepcache" if cpu
                                       else "eager,eager_cl,compiled,graphs,deepcache")).split(",")
    unknown = [v for v in args.variants if v not in VARIANTS] + [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown: {', '.join(unknown)}")
    args.deepcache = tuple(int(v) for v in args.deepcache.split(","))
    args.size = args.size or (256 if cpu else None)
    args.steps = args.steps or (1 if cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    if device.type == "cuda":
        for variant in args.variants:
            if VARIANTS[variant] is not None and VARIANTS[variant].backend:
                compiled.check_compile(VARIANTS[variant].backend, device)
                break

    machine = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
               "threads": torch.get_num_threads()}
    if device.type == "cuda":
        machine.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                       capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    else:
        machine["cpu"] = platform.processor() or platform.machine()
    print(json.dumps(machine))
    summary = {"machine": machine, "steps": args.steps, "repeats": args.repeats,
               "models": {name: run_model(name, args, device, dtype) for name in args.models}}
    args.json.write_text(json.dumps(summary, indent=1))
    print(f"\nresults: {args.json}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
