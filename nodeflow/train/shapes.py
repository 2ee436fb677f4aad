"""The demo data set: coloured shapes on coloured backgrounds, drawn on the fly, with captions.

Ten classes, a colour and a shape each (five colours × circle/square). Every image also has a
background colour, and captions vary in wording ("a red circle on a blue background",
"blue backdrop with a red disc", ...) so the text encoder must really read the prompt.
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
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    **COLOURS,
}
SHAPES = ("circle", "square")
SYNONYMS = {"circle": ("circle", "disc", "round dot"), "square": ("square", "box", "block")}
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


def caption(colour: str, shape: str, background: str, rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    return template.format(c=colour, s=rng.choice(SYNONYMS[shape]), b=background)


def prompt_for(colour: str, shape: str, background: str = "white") -> str:
    """The canonical prompt of a class (used for evaluation)."""
    return TEMPLATES[0].format(c=colour, s=shape, b=background)


def draw(colour: str, shape: str, background: str, size: int, rng: random.Random) -> np.ndarray:
    """One image: the shape, 40–65 % of the image wide, somewhere fully inside it."""
    scale = 4  # supersample for smooth edges
    big = size * scale
    im = Image.new("RGB", (big, big), BACKGROUNDS[background])
    d = ImageDraw.Draw(im)
    extent = int(big * rng.uniform(0.40, 0.65))
    x0 = rng.randint(int(big * 0.05), big - extent - int(big * 0.05))
    y0 = rng.randint(int(big * 0.05), big - extent - int(big * 0.05))
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    else:
        d.rectangle(box, fill=COLOURS[colour])
    return np.asarray(im.resize((size, size), Image.LANCZOS))


def sample(rng: random.Random, size: int = 64, cls: tuple[str, str] | None = None) -> Sample:
    colour, shape = cls or rng.choice(CLASSES)
    background = rng.choice([b for b in BACKGROUNDS if b != colour])
    return Sample(draw(colour, shape, background, size, rng), colour, shape, background,
                  caption(colour, shape, background, rng))


def dataset(n: int, seed: int = 0, size: int = 64) -> list[Sample]:
    rng = random.Random(seed)
    return [sample(rng, size) for _ in range(n)]
