"""Image decoding, one copy for every reader: files (the CPU loader's records), bytes (packed
shards), in-memory arrays (the phantom set), and the cheap check packing runs on every image.

Images are decoded with PIL and shrunk early: JPEGs in draft mode (DCT scaling at 1/2, 1/4, 1/8
while that still covers the target), then a resize of the short side to :func:`decode_size`, about
1.15x the model's image size (room for the crop's resampling). 16-bit and float greyscale images
(common in medical PNG/TIFF) are stretched to 8 bits, not clipped. A file that cannot be read or
decoded raises one of :data:`DECODE_ERRORS`; :func:`failure_reason` names it for the counts.

An image with more pixels than ``data.max_image_pixels`` (:func:`set_max_image_pixels`; PIL's own
default, about 89 million, unless set) is refused from its header, before any decoding, as
``too_large``: PIL's own check, a warning and gigabytes of memory up to twice its limit, is off.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

DECODE_MARGIN = 1.15  # decode to this times image_size: room for the crop's resampling
PIL_DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS
_max_pixels = PIL_DEFAULT_MAX_PIXELS
Image.MAX_IMAGE_PIXELS = None  # replaced by the check in _check_pixels (a count, not a warning)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


class SampleError(ValueError):
    """A sample that cannot be used, carrying the reason it is counted under (e.g. ``bad_token_ids``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def set_max_image_pixels(limit: int) -> None:
    """Images above ``limit`` pixels are refused as ``too_large`` (0: no limit). Set it before the
    loader's workers start: they inherit it."""
    global _max_pixels
    _max_pixels = limit


def _check_pixels(im: Image.Image) -> None:
    w, h = im.size
    if _max_pixels and w * h > _max_pixels:
        raise SampleError("too_large", f"{w}x{h} pixels, above data.max_image_pixels={_max_pixels}")


def decode_size(image_size: int) -> int:
    """The short side images are decoded to for views of ``image_size``."""
    return round(image_size * DECODE_MARGIN)


def failure_reason(err: Exception) -> str:
    """The ``skipped`` reason for an image that failed to load."""
    if isinstance(err, SampleError):
        return err.reason
    return "missing_image" if isinstance(err, FileNotFoundError) else "undecodable_image"


def to_uint8_rgb(im: Image.Image) -> Image.Image:
    """RGB; 16-bit and float greyscale stretched to 8 bits over their own range, not clipped."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype(np.uint8), "L")
    return im.convert("RGB")


def shrink(im: Image.Image, target: int) -> np.ndarray:
    """``HxWx3`` uint8 with the short side shrunk to ``target`` (never enlarged)."""
    w, h = im.size
    short = min(w, h)
    if short > target:
        size = (max(1, round(w * target / short)), max(1, round(h * target / short)))
        im = im.resize(size, Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(im)


def fit_image(im: Image.Image, target: int) -> np.ndarray:
    """A decoded PIL image -> ``HxWx3`` uint8 RGB, short side shrunk to ``target`` (never enlarged)."""
    return shrink(to_uint8_rgb(im), target)


def _decode_open(im: Image.Image, target: int) -> np.ndarray:
    _check_pixels(im)
    if im.format == "JPEG":
        im.draft("RGB", (target, target))  # DCT scaling: decodes at 1/2, 1/4, 1/8 when that still covers target
    return fit_image(im, target)


def decode_image(path, target: int) -> np.ndarray:
    """A file (path or file object) -> ``HxWx3`` uint8 with the short side shrunk to ``target`` (never
    enlarged). Raises on a bad file."""
    with Image.open(path) as im:
        return _decode_open(im, target)


def decode_image_bytes(data: bytes, target: int) -> np.ndarray:
    """Encoded bytes (a packed sample's image) -> as :func:`decode_image`."""
    with Image.open(io.BytesIO(data)) as im:
        return _decode_open(im, target)


def shrink_array(arr: np.ndarray, target: int) -> np.ndarray:
    """An in-memory ``HxWx3`` image with its short side shrunk to ``target``; a greyscale image
    broadcast over its channels (the phantom's) stays a broadcast view of one channel."""
    if min(arr.shape[:2]) <= target:
        return arr
    if arr.ndim == 3 and arr.strides[2] == 0:
        small = shrink(Image.fromarray(np.ascontiguousarray(arr[:, :, 0])), target)
        return np.broadcast_to(small[:, :, None], (*small.shape, 3))
    return shrink(Image.fromarray(np.ascontiguousarray(arr)), target)


def check_image_bytes(data: bytes) -> bool:
    """A cheap decode check: PIL parses the header, then decodes (JPEG at 1/8 scale, so ~1 ms)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(im)
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure to decode means the image is unusable
        return False


def open_rgb(image) -> Image.Image:
    """A path, encoded bytes, a PIL image or an ``HxW[x3]`` uint8 array -> an 8-bit RGB PIL image at
    full size (for another model's own preprocessing); raises on a bad file, as :func:`decode_image`."""
    if isinstance(image, np.ndarray):
        return to_uint8_rgb(Image.fromarray(np.ascontiguousarray(image)))
    if isinstance(image, Image.Image):
        return to_uint8_rgb(image)
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
        _check_pixels(im)
        return to_uint8_rgb(im)
