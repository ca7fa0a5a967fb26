"""Photo-like JPEGs made on the spot, for benchmarks and tests (smooth gradients plus sensor-like noise,
so they compress like photographs rather than like flat colour)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, width: int, height: int, noise: float = 12.0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-1.5, 1.5, size=(3, 2)) * (64.0 / max(width, height))
    channels = [base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, noise, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(rng: np.random.Generator, width: int, height: int, mode: str = "RGB", quality: int = 85,
               noise: float = 12.0) -> bytes:
    image = photo_like(rng, width, height, noise)
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_imagenet_like(root: str | Path, images: int, classes: int = 10, split: str = "train",
                        seed: int = 0, scale: float = 1.0, threads: int | None = None) -> Path:
    """``root/split/<wnid>/*.JPEG``: ImageNet-sized (about 460x350, ~110 KB) JPEGs for benchmarks; ``scale``
    resizes them (``size / 224`` keeps ImageNet's ratio of image to a ``size``-pixel training crop). Image
    ``i`` comes from its own generator ``(seed, i)``, so ``threads`` (default: the CPU count) never changes
    the files."""
    from concurrent.futures import ThreadPoolExecutor

    split_dir = Path(root) / split
    for c in range(min(classes, images)):
        (split_dir / f"n{1000000 + c:08d}").mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        wnid = f"n{1000000 + i % classes:08d}"
        w, h = int(rng.integers(400, 520)), int(rng.integers(300, 400))
        w, h = max(8, round(w * scale)), max(8, round(h * scale))
        (split_dir / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(rng, w, h, quality=95, noise=18.0))

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # PIL's encoder releases the GIL
        list(pool.map(one, range(images)))
    return split_dir
