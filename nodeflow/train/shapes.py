"""The demo data set: coloured shapes on coloured backgrounds, drawn on the fly, with captions.

Ten classes, a colour and a shape each (five colours × circle/triangle). Every image also has a
background colour of its own palette, and captions vary in wording ("a red circle on a gray
background", "cyan backdrop with a red disc", ...) so the text encoder must really read the prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
}
# Background colours are never shape colours, so "red" always names the shape: a model this
# small, trained for minutes, should not have to learn which object a colour word binds to.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "pink": (250, 180, 200),
    "cyan": (90, 210, 220),
}
# Circle and triangle differ at the coarsest scale (a point on top, a wide base), which a
# model working on 8×8 latents can draw; a square's corners are a one-cell detail there.
SHAPES = ("circle", "triangle")
SYNONYMS = {"circle": ("circle", "disc"), "triangle": ("triangle", "wedge")}
CLASSES: list[tuple[str, str]] = [(c, s) for s in SHAPES for c in COLOURS]

TEMPLATES = (
    "a {c} {s} on a {b} background",
    "{c} {s}, {b} background",
    "a picture of a {c} {s} over {b}",
    "{b} backdrop with a {c} {s}",
    "a drawing of a {c} {s} on {b}",
    "a {c} {s}",
    "one {c} {s} in front of a {b} wall",
)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # [H, W, 3] uint8
    colour: str
    shape: str
    background: str
    caption: str

    @property
    def label(self) -> int:
        return CLASSES.index((self.colour, self.shape))


def attribute_labels(s: Sample) -> tuple[int, int, int]:
    """(colour, shape, background) indices of what the caption says; -100 for the background
    when the caption leaves it out (the ignore index of a cross-entropy loss)."""
    said = s.background in s.caption
    return (list(COLOURS).index(s.colour), SHAPES.index(s.shape),
            list(BACKGROUNDS).index(s.background) if said else -100)


def caption(colour: str, shape: str, background: str, rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    return template.format(c=colour, s=rng.choice(SYNONYMS[shape]), b=background)


def prompt_for(colour: str, shape: str, background: str = "white") -> str:
    """The canonical prompt of a class (used for evaluation)."""
    return TEMPLATES[0].format(c=colour, s=shape, b=background)


def draw(colour: str, shape: str, background: str, size: int, rng: random.Random) -> np.ndarray:
    """One image: the shape, 50–75 % of the image wide, somewhere fully inside it."""
    scale = 4  # supersample for smooth edges
    big = size * scale
    im = Image.new("RGB", (big, big), BACKGROUNDS[background])
    d = ImageDraw.Draw(im)
    extent = int(big * rng.uniform(0.50, 0.75))
    margin = int(big * 0.08)  # clear of the edge, where decoders smear
    x0 = rng.randint(margin, big - extent - margin)
    y0 = rng.randint(margin, big - extent - margin)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    else:  # pointing up
        d.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=COLOURS[colour])
    return np.asarray(im.resize((size, size), Image.LANCZOS))


def sample(rng: random.Random, size: int = 64, cls: tuple[str, str] | None = None) -> Sample:
    colour, shape = cls or rng.choice(CLASSES)
    background = rng.choice(list(BACKGROUNDS))
    return Sample(draw(colour, shape, background, size, rng), colour, shape, background,
                  caption(colour, shape, background, rng))


def dataset(n: int, seed: int = 0, size: int = 64) -> list[Sample]:
    rng = random.Random(seed)
    return [sample(rng, size) for _ in range(n)]
