"""Generate small ImageNet-style folder trees of real image files, with the defects real ImageNet has."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.synthetic import jpeg_bytes


def png_bytes(rng: np.random.Generator, width: int, height: int) -> bytes:
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    return out.getvalue()


@dataclass
class Tree:
    root: Path
    classes: list[str]
    good: dict[str, int] = field(default_factory=dict)  # relpath -> label, stored byte for byte
    converted: dict[str, tuple[int, str]] = field(default_factory=dict)  # relpath -> (label, conversion)
    bad: dict[str, str] = field(default_factory=dict)  # relpath -> reason fragment
    ignored: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> dict[str, int]:
        return {**self.good, **{k: v[0] for k, v in self.converted.items()}}


def make_tree(root: Path, split: str = "train", num_classes: int = 4, per_class: int = 6, seed: int = 0,
              defects: bool = True, size_range: tuple[int, int] = (24, 96)) -> Tree:
    """``root/split/<wnid>/*.JPEG``; with ``defects``: PNG and CMYK and grayscale disguised as .JPEG, a
    truncated JPEG, an empty file, a text file, unicode names and an empty class folder."""
    rng = np.random.default_rng(seed)
    classes = [f"n{1000000 + 7919 * i:08d}" for i in range(num_classes)]
    tree = Tree(root, classes)
    split_dir = root / split
    for label, wnid in enumerate(classes):
        folder = split_dir / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w, h = (int(v) for v in rng.integers(*size_range, size=2))
            name = f"{wnid}_{j}.JPEG"
            (folder / name).write_bytes(jpeg_bytes(rng, w, h))
            tree.good[f"{wnid}/{name}"] = label
    if defects:
        a, b = classes[0], classes[1 % num_classes]
        _put(tree, split_dir, f"{a}/{a}_png.JPEG", png_bytes(rng, 40, 30), label=0, conversion="png->jpeg")
        _put(tree, split_dir, f"{b}/{b}_cmyk.JPEG", jpeg_bytes(rng, 50, 40, mode="CMYK"), label=1 % num_classes,
             conversion="cmyk->rgb")
        _put(tree, split_dir, f"{a}/{a}_gray.JPEG", jpeg_bytes(rng, 33, 44, mode="L"), label=0, conversion="l->rgb")
        _put(tree, split_dir, f"{b}/ünïcödé_日本_{b}.JPEG", jpeg_bytes(rng, 60, 45), label=1 % num_classes)
        truncated = jpeg_bytes(rng, 120, 90)
        (split_dir / a / "truncated.JPEG").write_bytes(truncated[: len(truncated) // 2])
        tree.bad[f"{a}/truncated.JPEG"] = "truncated"
        (split_dir / b / "empty.JPEG").write_bytes(b"")
        tree.bad[f"{b}/empty.JPEG"] = "empty"
        (split_dir / a / "notes.txt").write_text("not an image\n")
        tree.ignored.append(f"{a}/notes.txt")
        empty = "n99999999"
        (split_dir / empty).mkdir(parents=True, exist_ok=True)
        tree.classes = sorted([*classes, empty])
        tree.empty_classes.append(empty)
        # class indices are sorted folder names: the empty class sorts last, so others keep theirs
    return tree


def _put(tree: Tree, split_dir: Path, relpath: str, data: bytes, label: int, conversion: str = "") -> None:
    path = split_dir / relpath
    path.write_bytes(data)
    if conversion:
        tree.converted[relpath] = (label, conversion)
    else:
        tree.good[relpath] = label
