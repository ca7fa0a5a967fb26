"""Decide, per source file, whether its bytes can go into a shard as they are, need converting, or are bad.

GPU JPEG decoders (nvJPEG) reject some of what real ImageNet holds: a PNG saved as .JPEG, CMYK JPEGs,
grayscale JPEGs. Those are converted to RGB JPEG here, once, at build time; everything else is stored
byte for byte (the common case costs one header parse, no decode). Unreadable, empty or truncated files
raise `BadImage`, which the shard writer records in the build report.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 95  # for the rare converted files; originals are stored untouched
MAX_PIXELS = 1 << 28  # 268 Mpx: beyond this an image is refused unless --max-side downscales it
_EOI = b"\xff\xd9"
_EOI_WINDOW = 4096  # some writers pad a few bytes after the end-of-image marker


class BadImage(ValueError):
    """A source file that cannot become a sample; the message is the reason shown in the build report."""


@dataclass(frozen=True)
class PreparedImage:
    data: bytes  # what goes into the shard: the original bytes, or an RGB JPEG re-encoding
    width: int
    height: int
    conversion: str  # "" when stored as is, else e.g. "png->jpeg", "cmyk->rgb", "resized"


def has_end_marker(data: bytes) -> bool:
    """Cheap truncation check: a complete JPEG ends with FFD9 (never inside entropy-coded data)."""
    return data.rfind(_EOI, max(0, len(data) - _EOI_WINDOW)) != -1


def prepare_image(data: bytes, max_side: int | None = None, verify_decode: bool = False) -> PreparedImage:
    """Check one file's bytes and return what to store; raises `BadImage` with the reason."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    image = _open(data)
    width, height = image.size
    changes: list[str] = []
    if image.format != "JPEG":
        changes.append(f"{(image.format or 'unknown').lower()}->jpeg")
    elif image.mode != "RGB":
        changes.append(f"{image.mode.lower()}->rgb")
    if image.format == "JPEG" and not has_end_marker(data):
        _load(image, "truncated JPEG (no end-of-image marker)")
        changes.append("reencoded: no end marker")
    if max_side and max(width, height) > max_side:
        changes.append("resized")
    elif width * height > MAX_PIXELS:
        raise BadImage(f"too large ({width}x{height} px); pass --max-side to downscale at build time")
    if not changes:
        if verify_decode:
            _load(image, "corrupt JPEG data")
        return PreparedImage(data, width, height, "")
    return _reencode(image, max_side, ", ".join(changes))


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"not a readable image ({type(exc).__name__}: {exc})") from None


def _load(image: Image.Image, reason: str) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"{reason}: {exc}") from None


def _reencode(image: Image.Image, max_side: int | None, conversion: str) -> PreparedImage:
    if max_side and image.format == "JPEG":
        image.draft("RGB", (max_side, max_side))  # decode huge JPEGs at 1/2, 1/4, 1/8 scale directly
    _load(image, "truncated or corrupt image")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels become white, not black
    else:
        rgb = image.convert("RGB")
    if max_side and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=JPEG_QUALITY)
    return PreparedImage(out.getvalue(), rgb.width, rgb.height, conversion)
