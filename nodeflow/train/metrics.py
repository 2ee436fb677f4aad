"""Measuring the demo model: a shape/colour classifier trained on real images, and a Fréchet
distance between the classifier's features of generated and real images.

The features are measurements, not a learned network: the background colour (the median of
a ring just inside the image's edge), the foreground (pixels far from it), its mean colour, how
much of its bounding box it fills (circle ≈ π/4, triangle ≈ 1/2), where its mass sits in the
box (circle 1/2 of the way down, upward triangle 2/3) and its size. A nearest-centroid classifier on
standardised features, fitted on the training set, names the class.
"""

from __future__ import annotations

import numpy as np

from nodeflow.train.shapes import CLASSES, Sample

FRAME = 3
FEATURES = ("fg_r", "fg_g", "fg_b", "bg_r", "bg_g", "bg_b", "fill", "area", "aspect", "centre_y")


def features(image: np.ndarray) -> np.ndarray:
    """Measurements of one image [H, W, 3] (uint8 or float 0..1) -> [len(FEATURES)] float."""
    img = image.astype(np.float64)
    if img.max() <= 1.0 + 1e-6:
        img = img * 255.0
    # Decoders smear the outermost pixels: measure inside a 3-pixel frame, taking the
    # background from the ring just inside it.
    img = img[FRAME:-FRAME, FRAME:-FRAME]
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    fg = dist > 60.0
    if fg.sum() < 4:
        return np.array([*bg, *bg, 0.0, 0.0, 1.0, 0.5])
    ys, xs = np.nonzero(fg)
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    colour = img[fg].mean(axis=0)
    centre_y = (ys.mean() - ys.min() + 0.5) / bh  # circle 1/2, upward triangle 2/3
    return np.array([*colour, *bg, fg.sum() / (bh * bw), fg.sum() / (h * w), bw / bh, centre_y])


class ShapeClassifier:
    """Nearest centroid on standardised features (colour and fill weigh most)."""

    WEIGHTS = np.array([1, 1, 1, 0, 0, 0, 3, 0, 0, 3], dtype=np.float64)

    def fit(self, samples: list[Sample]) -> ShapeClassifier:
        x = np.stack([features(s.image) for s in samples])
        y = np.array([s.label for s in samples])
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mean) / self.std
        self.centroids = np.stack([z[y == k].mean(0) for k in range(len(CLASSES))])
        return self

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        d = (((z[:, None, :] - self.centroids[None]) ** 2) * self.WEIGHTS).sum(-1)
        return d.argmin(1)

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        return self.predict_features(np.stack([features(im) for im in images]))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]:
    |μa − μb|² + Tr(Σa + Σb − 2 (Σa Σb)^½)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((Σa Σb)^½) = Σ √λ of the symmetric PSD matrix Σa^½ Σb Σa^½.
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_root)
