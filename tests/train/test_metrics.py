"""The demo's measuring tools: data, classifier and Fréchet distance, against known answers."""

import random

import numpy as np

from nodeflow.train.metrics import ShapeClassifier, features, frechet_distance
from nodeflow.train.shapes import CLASSES, COLOURS, dataset, draw, sample


def test_drawn_images_have_the_asked_colour_and_shape():
    rng = random.Random(0)
    img = draw("red", "triangle", "white", 64, rng)
    f = features(img)
    assert np.allclose(f[:3], COLOURS["red"], atol=15)
    assert np.allclose(f[3:6], (235, 235, 235), atol=1)
    assert abs(f[6] - 0.5) < 0.08  # a triangle fills half its bounding box
    assert abs(f[9] - 2 / 3) < 0.05  # and its mass sits two thirds of the way down
    circle = features(draw("blue", "circle", "black", 64, rng))
    assert abs(circle[6] - np.pi / 4) < 0.06 and abs(circle[9] - 0.5) < 0.03


def test_captions_vary_and_name_the_class():
    rng = random.Random(1)
    caps = {sample(rng, 32, ("green", "circle")).caption for _ in range(40)}
    assert len(caps) > 5 and all("green" in c for c in caps)


def test_classifier_recognises_real_images():
    clf = ShapeClassifier().fit(dataset(600, seed=0, size=64))
    test = dataset(200, seed=1, size=64)
    acc = (clf.predict([s.image for s in test]) == np.array([s.label for s in test])).mean()
    assert acc > 0.95
    assert len(CLASSES) == 10


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) + np.array([3.0, 0.0, 0.0])
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a, b) - 9.0) < 0.2  # only the means differ: |Δμ|² = 9
    c = rng.normal(size=(20000, 3)) * 2.0  # Σ = 4I vs I: 3 · (1 + 4 − 2·2) = 3
    assert abs(frechet_distance(a, c) - 3.0) < 0.2
