"""Small real labelled image sets for the embedded demo and the benchmarks: scikit-learn's handwritten
digits (shipped inside the package, nothing downloaded) written as ImageNet-style trees of RGB JPEGs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image


def _split_digits(val_fraction: float, seed: int) -> Iterator[tuple[str, int, np.ndarray, np.ndarray]]:
    """(split, label, indices of that label's images in the split, all 8x8 digit images): a seeded, per-class
    split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        cut = int(round(len(indices) * val_fraction))
        for split, chosen in (("val", indices[:cut]), ("train", indices[cut:])):
            yield split, label, chosen, digits.images


def _digit(pixels: np.ndarray, size: int) -> Image.Image:
    """One 8x8 digit (values 0-16) as a grey size x size image."""
    image = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), "L")
    return image.resize((size, size), Image.Resampling.BICUBIC)


def write_digits_tree(root: str | Path, size: int = 32, val_fraction: float = 0.2,
                      seed: int = 0) -> dict[str, int]:
    """``root/{train,val}/digit<k>/<i>.JPEG``; a seeded, per-class split. Returns images per split."""
    counts = {"train": 0, "val": 0}
    for split, label, chosen, images in _split_digits(val_fraction, seed):
        folder = Path(root) / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in chosen:
            _digit(images[i], size).convert("RGB").save(folder / f"{i:04d}.JPEG", "JPEG", quality=95)
            counts[split] += 1
    return counts


MOSAIC_LARGE, MOSAIC_SMALL = 0.6, 0.3  # sides of the labelled and the distracting digit, relative to the image


def write_mosaic_tree(root: str | Path, size: int = 64, val_fraction: float = 0.2,
                      seed: int = 0) -> dict[str, int]:
    """Digits with a distractor, a set where the crop decides the label: each image shows its labelled digit
    large (0.6 of the side) in a random corner and a digit of another class small (0.3 of the side) in the
    opposite corner. A crop of the small digit alone, enlarged to the view's size, looks like an image of the
    other class, as a view of a background object in an ImageNet photo does: a teacher cache follows that
    only if it knows the view's crop box. Same tree layout and split as `write_digits_tree`."""
    rng = np.random.default_rng(seed + 1)
    large, small = round(MOSAIC_LARGE * size), round(MOSAIC_SMALL * size)
    splits = list(_split_digits(val_fraction, seed))
    counts = {"train": 0, "val": 0}
    for split, label, chosen, images in splits:
        others = np.concatenate([c for s, lab, c, _ in splits if s == split and lab != label])
        folder = Path(root) / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in chosen:
            canvas = np.zeros((size, size), np.uint8)
            corner_y, corner_x = rng.integers(0, 2, size=2)  # the large digit's corner; the small one's is opposite
            for pixels, side, at_y, at_x in ((images[i], large, corner_y, corner_x),
                                             (images[rng.choice(others)], small, 1 - corner_y, 1 - corner_x)):
                y, x = at_y * (size - side), at_x * (size - side)
                region = canvas[y:y + side, x:x + side]
                np.maximum(region, np.asarray(_digit(pixels, side)), out=region)
            Image.fromarray(canvas, "L").convert("RGB").save(folder / f"{i:04d}.JPEG", "JPEG", quality=95)
            counts[split] += 1
    return counts


IMAGE_SETS = {"digits": (write_digits_tree, 32), "mosaic": (write_mosaic_tree, 64)}  # name -> (writer, side)
