"""Measuring a demo checkpoint through the real node graph.

For each of the ten classes, ``per_class`` images are generated from the canonical prompt
("a red circle on a white background", ...) by LoadModel → EncodeText → Sample → VAEDecode,
and the shape classifier (fitted on real training images) says what it sees. Adherence is
the fraction recognised as what the prompt asked for; the same images generated from an
empty prompt give the unconditional baseline (chance is 10 %). The Fréchet distance compares
the classifier's features of the generated images with those of real drawings of what the
prompts describe.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodeflow import Executor, Workflow, default_registry
from nodeflow.context import RunContext
from nodeflow.folders import Folders
from nodeflow.train.metrics import ShapeClassifier, features, frechet_distance
from nodeflow.train.shapes import CLASSES, dataset, draw, prompt_for


@dataclass
class Report:
    adherence: float             # conditional images recognised as the asked class
    colour_adherence: float      # ... whose recognised colour is the asked one
    shape_adherence: float       # ... whose recognised shape is the asked one
    unconditional: float         # empty-prompt images "recognised" as the class assigned to them
    frechet: float               # classifier-feature Fréchet distance, generated vs real drawings of the prompts
    frechet_real: float          # the same between two real sets of that size: the floor of the measure
    seconds_per_image: float
    per_class: dict[str, float]
    images: np.ndarray           # [N, H, W, 3] uint8, the conditional images, class by class


def generate(checkpoint: Path, prompts: list[str], *, per_prompt: int, seed: int = 0, steps: int = 20,
             cfg: float = 5.0, sampler: str = "euler", scheduler: str = "normal", size: int = 64,
             model_node: tuple[str, dict] | None = None) -> np.ndarray:
    """Images [len(prompts) * per_prompt, H, W, 3] uint8 for each prompt, through the node graph;
    ``model_node`` (class, inputs) patches the MODEL on its way to the sampler (e.g. DeepCache)."""
    checkpoint = Path(checkpoint).resolve()
    scratch = tempfile.TemporaryDirectory(prefix="nodeflow-eval-")  # previews land here, not beside the checkpoint
    folders = Folders.from_base(scratch.name, extra_models={"checkpoints": [str(checkpoint.parent)]})
    try:
        executor = Executor(default_registry(), context=RunContext(folders, name="evaluation"))
        out = []
        for i, prompt in enumerate(prompts):
            wf = Workflow()
            ckpt = wf.add("LoadModel", ckpt_name=checkpoint.name)
            model = ckpt[0] if model_node is None else wf.add(model_node[0], model=ckpt[0], **model_node[1])[0]
            pos = wf.add("EncodeText", text=prompt, clip=ckpt[1])
            neg = wf.add("EncodeText", text="", clip=ckpt[1])
            latent = wf.add("EmptyLatent", width=size, height=size, batch_size=per_prompt)
            sample = wf.add("Sample", model=model, seed=seed + i, steps=steps, cfg=cfg, sampler_name=sampler,
                            scheduler=scheduler, positive=pos[0], negative=neg[0], latent_image=latent[0], denoise=1.0)
            image = wf.add("VAEDecode", samples=sample[0], vae=ckpt[2])
            wf.add("PreviewImage", images=image[0])
            result = executor.run(wf.to_api())
            if not result.ok:
                raise RuntimeError(f"generation failed: {result.error}")
            out.append((result.output(image.id).numpy() * 255).round().astype(np.uint8))
        return np.concatenate(out)
    finally:
        scratch.cleanup()


def evaluate(checkpoint: Path, *, per_class: int = 10, seed: int = 0, steps: int = 20, cfg: float = 5.0,
             real_images: int = 1000, model_node: tuple[str, dict] | None = None) -> Report:
    real = dataset(real_images, seed=1234)
    classifier = ShapeClassifier().fit(real)
    prompts = [prompt_for(c, s) for c, s in CLASSES]
    t0 = time.perf_counter()
    images = generate(checkpoint, prompts, per_prompt=per_class, seed=seed, steps=steps, cfg=cfg, model_node=model_node)
    seconds = (time.perf_counter() - t0) / len(images)
    asked = np.repeat(np.arange(len(CLASSES)), per_class)
    predicted = classifier.predict(list(images))
    hits = predicted == asked
    uncond = generate(checkpoint, [""], per_prompt=len(images), seed=seed + 1000, steps=steps, cfg=1.0,
                      model_node=model_node)
    uncond_hits = classifier.predict(list(uncond)) == asked
    # The Fréchet reference is what the prompts describe: real drawings of the same classes on
    # the same (white) background, as many per class as were generated, twice over for the floor.
    rng = random.Random(seed + 77)
    reference = [draw(c, s, "white", images.shape[1], rng) for _ in range(2 * per_class) for c, s in CLASSES]
    gen_f = np.stack([features(im) for im in images])
    real_f = np.stack([features(im) for im in reference])
    half = len(real_f) // 2
    colours = np.array([c for c, _ in CLASSES])
    shapes = np.array([s for _, s in CLASSES])
    return Report(
        adherence=float(hits.mean()), unconditional=float(uncond_hits.mean()),
        colour_adherence=float((colours[predicted] == colours[asked]).mean()),
        shape_adherence=float((shapes[predicted] == shapes[asked]).mean()),
        frechet=frechet_distance(gen_f, real_f[:half]), frechet_real=frechet_distance(real_f[:half], real_f[half:]),
        seconds_per_image=seconds,
        per_class={f"{c} {s}": float(hits[asked == k].mean()) for k, (c, s) in enumerate(CLASSES)},
        images=images)


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """Tile images [N, H, W, 3] into rows of ``columns``."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.full((rows * h, columns * w, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, columns)
        out[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
    return out
