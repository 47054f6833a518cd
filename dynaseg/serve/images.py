"""Untrusted image bytes: size from the header before any decoding, then RGB decoding; 4xx on failure."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from dynaseg.serve.limits import RequestError

__all__ = ["FORMATS", "probe_image", "decode_image"]

# Formats Pillow may open; others (EPS, which runs Ghostscript, PSD, ...) are refused.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_NOT_AN_IMAGE = "not a supported image (JPEG, PNG, WebP, BMP, GIF or TIFF)"


def _bomb(e: Exception) -> RequestError:
    return RequestError(413, f"image refused as a decompression bomb: {e}")


def probe_image(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header only; 413 over ``max_pixels`` or Pillow's
    decompression-bomb limit, 422 when the header is not that of a supported image."""
    try:
        with Image.open(
            io.BytesIO(data), formats=FORMATS
        ) as im:  # reads the header, not the pixels
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise _bomb(e) from None
    except Image.UnidentifiedImageError:
        raise RequestError(422, _NOT_AN_IMAGE) from None
    except Exception as e:  # Pillow's parsers raise many types on malformed headers
        raise RequestError(422, f"corrupt image header: {e}") from None
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"image of {width}x{height} = {width * height} pixels exceeds the limit "
            f"of {max_pixels} pixels",
        )
    if width < 1 or height < 1:
        raise RequestError(422, f"image has no pixels ({width}x{height})")
    return width, height


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB, writable (EXIF orientation applied, first frame, alpha dropped, 16-bit
    reduced to 8); 422 when the data is truncated or corrupt. Call :func:`probe_image` first."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                gray = np.asarray(im, dtype=np.float32)
                if gray.max(initial=0) > 255:
                    gray = gray / 256
                return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            return np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise _bomb(e) from None
    except Exception as e:
        raise RequestError(422, f"truncated or corrupt image: {e}") from None
