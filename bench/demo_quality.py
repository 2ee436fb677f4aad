"""How well the demo model follows its prompts, and how long it takes to make.

    python bench/demo_quality.py                 # measure the shipped (or installed) demo checkpoint
    python bench/demo_quality.py --train         # train from scratch first, timing it
    python bench/demo_quality.py --grid docs/demo.png
    python bench/demo_quality.py --deepcache 3,1       # the same through DeepCache (interval 3, depth 1)

Prints: training time (with --train), seconds per generated image, prompt adherence over
100 images (10 classes × 10, the classifier fitted on real images) against the
unconditional baseline (chance: 10 %), per-class adherence, and the Fréchet distance of the
classifier's features between generated and real images (with the real-vs-real floor).
Targets: training < 10 min on 2 CPU cores; < 5 s per image; adherence ≥ 80 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from nodeflow.train import assets
from nodeflow.train.evaluate import evaluate, grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="default: the shipped demo checkpoint")
    ap.add_argument("--train", action="store_true", help="train a fresh checkpoint first (timed)")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--grid", type=Path, help="save the generated images as one PNG")
    ap.add_argument("--deepcache", metavar="INTERVAL[,DEPTH]",
                    help="sample through the DeepCache node (e.g. 3,1): its speed and quality cost on this model")
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    ckpt = args.checkpoint or assets.SHIPPED
    if args.train:
        from nodeflow.train.demo import train

        ckpt = Path(tempfile.mkdtemp()) / assets.DEMO_CHECKPOINT
        t0 = time.perf_counter()
        train(ckpt)
        print(f"training from scratch: {(time.perf_counter() - t0) / 60:.1f} min (target < 10)")
    if not Path(ckpt).is_file():
        sys.exit(f"no checkpoint at {ckpt}: pass --checkpoint or --train")
    model_node = None
    if args.deepcache:
        interval, _, depth = args.deepcache.partition(",")
        model_node = ("DeepCache", {"cache_interval": int(interval), "cache_depth": int(depth or 3),
                                    "start_step": 0, "end_step": 1000})
        print(f"DeepCache: interval {interval}, depth {depth or 3}")
    r = evaluate(ckpt, per_class=args.per_class, steps=args.steps, cfg=args.cfg, model_node=model_node)
    n = args.per_class * 10
    print(f"sampling: {r.seconds_per_image:.2f} s per image ({args.steps} steps, 64x64, batch {args.per_class})"
          " (target < 5)")
    print(f"prompt adherence: {r.adherence:.0%} of {n} images (target >= 80%); "
          f"unconditional baseline: {r.unconditional:.0%} (chance 10%)")
    print(f"  the colour asked for: {r.colour_adherence:.0%}; the shape asked for: {r.shape_adherence:.0%}")
    for name, acc in r.per_class.items():
        print(f"  {name:16s} {acc:.0%}")
    print(f"Frechet distance (classifier features), generated vs real: {r.frechet:.1f} "
          f"(real vs real: {r.frechet_real:.1f})")
    if args.grid:
        from PIL import Image

        args.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(r.images, args.per_class)).save(args.grid, optimize=True)
        print(f"saved {args.grid}")


if __name__ == "__main__":
    main()
