"""A small real labelled image set for the embedded demo: scikit-learn's handwritten digits (shipped inside
the package, nothing downloaded) written as an ImageNet-style tree of RGB JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_tree(root: str | Path, size: int = 32, val_fraction: float = 0.2,
                      seed: int = 0) -> dict[str, int]:
    """``root/{train,val}/digit<k>/<i>.JPEG``; a seeded, per-class split. Returns images per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        cut = int(round(len(indices) * val_fraction))
        for split, chosen in (("val", indices[:cut]), ("train", indices[cut:])):
            folder = Path(root) / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                image = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
                image.convert("RGB").save(folder / f"{i:04d}.JPEG", "JPEG", quality=95)
                counts[split] += 1
    return counts
