"""The generated image sets the demo and the benchmarks train on: real digits, and the mosaic, whose crops
change the label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.demo import MOSAIC_LARGE, MOSAIC_SMALL, _digit, write_digits_tree, write_mosaic_tree


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.JPEG"))


def test_mosaic_holds_the_labelled_digit_large_and_a_digit_of_another_class_small_in_the_opposite_corner(
        tmp_path: Path) -> None:
    size = 40
    counts = write_mosaic_tree(tmp_path / "mosaic", size=size)
    assert counts == write_digits_tree(tmp_path / "digits", size=8)
    assert _files(tmp_path / "mosaic") == _files(tmp_path / "digits")  # same split, same images labelled
    digits = load_digits()
    large, small = round(MOSAIC_LARGE * size), round(MOSAIC_SMALL * size)
    smalls = np.stack([np.asarray(_digit(p, small), np.float32) for p in digits.images])
    paths = sorted((tmp_path / "mosaic").rglob("*.JPEG"))[::37]  # every class, both splits
    assert {p.parent.name for p in paths} == {f"digit{k}" for k in range(10)}
    for path in paths:
        label, index = int(path.parent.name.removeprefix("digit")), int(path.stem)
        assert digits.target[index] == label
        image = np.asarray(Image.open(path).convert("L"), np.float32)
        far = size - large  # a corner's offset
        corners = {(y, x): image[y * far:y * far + large, x * far:x * far + large] for y in (0, 1) for x in (0, 1)}
        brightest = max(corners, key=lambda c: corners[c].sum())  # the large digit's corner
        want = np.asarray(_digit(digits.images[index], large), np.float32)
        assert np.abs(corners[brightest] - want).mean() < 12, path  # JPEG's error, where the small one is not
        y, x = (1 - brightest[0]) * (size - small), (1 - brightest[1]) * (size - small)
        distractor = image[y:y + small, x:x + small]
        nearest = int(np.abs(smalls - distractor).mean(axis=(1, 2)).argmin())
        assert digits.target[nearest] != label, path
        assert np.abs(smalls[nearest] - distractor).mean() < 12, path
        blank = image.copy()  # nothing outside the two digits
        for (y0, x0), side in (((brightest[0] * far, brightest[1] * far), large), ((y, x), small)):
            blank[y0:y0 + side, x0:x0 + side] = 0
        assert blank.mean() < 4, path
