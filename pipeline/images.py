"""Decide, per source file, whether its bytes can go into a shard as they are, need converting, or are bad.

GPU JPEG decoders (nvJPEG) reject some of what real ImageNet holds: a PNG saved as .JPEG, CMYK JPEGs,
grayscale JPEGs. Those are converted to RGB JPEG here, once, at build time; everything else is stored
byte for byte (the common case costs one header parse, no decode). Unreadable, empty or truncated files
raise `BadImage`, which the shard writer records in the build report.

Huge images: one of at most `MAX_PIXELS` (89.5 Mpx, e.g. 20000x4470) is stored as it is; a larger one is
bad ("pass --max-side") unless ``--max-side`` downscales it. Memory stays bounded: a JPEG is decoded
straight at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's draft mode), so a 20000x20000 JPEG costs
about 20 MB; other formats have no reduced decoding, and one that would need more than
`MAX_DECODE_PIXELS` decoded is bad ("downscale it before building"). Nothing is fully decoded before these
checks, so PIL's decompression-bomb guard never fires here.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 95  # for the rare converted files; originals are stored untouched
# Largest image stored: PIL's own decompression-bomb threshold (it warns above, refuses above twice as much),
# so every stored image opens in PIL-based readers (`pipeline inspect --decode`, eval transforms) as is.
MAX_PIXELS = 89_478_485  # = PIL's default Image.MAX_IMAGE_PIXELS, 256 MiB as RGB
MAX_DECODE_PIXELS = 2 * MAX_PIXELS  # largest decode at build time (PIL refuses more): ~540 MB as RGB
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
    truncated = image.format == "JPEG" and not has_end_marker(data)
    if truncated:
        changes.append("reencoded: no end marker")
    if max_side and max(width, height) > max_side:
        changes.append("resized")
    elif width * height > MAX_PIXELS:
        if image.format != "JPEG" and width * height > MAX_DECODE_PIXELS:
            raise BadImage(_too_large_to_decode(image))
        raise BadImage(f"too large to store as is ({width}x{height} px, over {MAX_PIXELS} px); "
                       f"pass --max-side (e.g. 1024) to downscale it at build time")
    if not changes:
        if verify_decode:
            _load(image, "corrupt JPEG data")
        return PreparedImage(data, width, height, "")
    reason = "truncated JPEG (no end-of-image marker)" if truncated else "truncated or corrupt image"
    return _reencode(image, max_side, ", ".join(changes), reason)


def _too_large_to_decode(image: Image.Image) -> str:
    width, height = image.size
    return (f"too large to decode ({width}x{height} px {image.format or 'image'}, over {MAX_DECODE_PIXELS} px, "
            f"and only JPEGs can be decoded at reduced size); downscale it before building")


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
        with warnings.catch_warnings():  # sizes were checked against our limits; GIF frames check again
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"{reason}: {exc}") from None


def _reencode(image: Image.Image, max_side: int | None, conversion: str, reason: str) -> PreparedImage:
    if max_side and image.format == "JPEG":
        image.draft("RGB", (max_side, max_side))  # decode huge JPEGs at 1/2, 1/4, 1/8 scale directly
    if image.width * image.height > MAX_DECODE_PIXELS:  # the size to be decoded, after draft
        raise BadImage(_too_large_to_decode(image))
    _load(image, reason)
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
