"""Per-file checks and conversions, on real encoded images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import BadImage, prepare_image
from pipeline.synthetic import jpeg_bytes


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_rgb_jpeg_is_stored_byte_for_byte() -> None:
    data = jpeg_bytes(np.random.default_rng(0), 64, 48)
    prepared = prepare_image(data)
    assert prepared.data is data and prepared.conversion == "" and (prepared.width, prepared.height) == (64, 48)


@pytest.mark.parametrize(("mode", "fmt", "conversion"), [
    ("CMYK", "JPEG", "cmyk->rgb"), ("L", "JPEG", "l->rgb"), ("RGB", "PNG", "png->jpeg"),
])
def test_defective_kinds_become_rgb_jpeg_of_the_same_picture(mode: str, fmt: str, conversion: str) -> None:
    source = Image.open(io.BytesIO(jpeg_bytes(np.random.default_rng(1), 40, 30))).convert(mode)
    prepared = prepare_image(_encode(source, fmt))
    assert prepared.conversion == conversion
    out = _decoded(prepared.data)
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (40, 30))
    reference = np.asarray(source.convert("RGB"), dtype=np.float32)
    assert np.abs(np.asarray(out, dtype=np.float32) - reference).mean() < 6.0


def test_transparent_png_gets_a_white_background() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = _decoded(prepare_image(_encode(rgba, "PNG")).data)
    assert min(out.getpixel((4, 4))) > 240


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty file"), (b"hello, not an image", "not a readable image"),
])
def test_unreadable_files_are_bad(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage, match=reason):
        prepare_image(data)


def test_truncated_jpeg_is_bad() -> None:
    data = jpeg_bytes(np.random.default_rng(2), 120, 90)
    with pytest.raises(BadImage, match="truncated"):
        prepare_image(data[: len(data) * 2 // 3])


def test_max_side_downscales_keeping_aspect() -> None:
    prepared = prepare_image(jpeg_bytes(np.random.default_rng(3), 400, 100), max_side=200)
    assert (prepared.width, prepared.height, prepared.conversion) == (200, 50, "resized")
    assert _decoded(prepared.data).size == (200, 50)


def test_generated_imagenet_like_files_do_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    from pipeline.synthetic import write_imagenet_like

    trees = [write_imagenet_like(tmp_path / str(t), 12, classes=5, threads=t) for t in (1, 3)]
    files = [{f.relative_to(tree): f.read_bytes() for f in tree.rglob("*.JPEG")} for tree in trees]
    assert len(files[0]) == 12 and len({f.parent for f in files[0]}) == 5
    assert files[0] == files[1]
    sizes = {Image.open(io.BytesIO(data)).size for data in files[0].values()}
    assert all(400 <= w < 520 and 300 <= h < 400 for w, h in sizes)
