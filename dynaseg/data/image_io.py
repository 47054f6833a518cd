"""Robust image decoding to ``(3, H, W) uint8`` RGB tensors.

``torchvision.io.decode_image`` is the fast path (libjpeg-turbo, EXIF orientation applied); Pillow
decodes PNGs (torchvision 0.29's PNG decoder crashes the process with a segmentation fault on some
corrupt PNGs, e.g. a flipped byte in the compressed data) and what torchvision cannot decode (BMP,
TIFF, ...). The header is read first (Pillow, lazily), so a file whose declared size disagrees with
the annotation, or exceeds Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` x 2), is
refused before any pixel is decoded. Every failure -- missing file, unknown format, truncated or
corrupt data, size that disagrees with the annotation -- raises :class:`ImageReadError`, whose
message starts with the file path.
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
import torch
from torch import Tensor

from dynaseg.data.coco import unwrap_worker_message
from dynaseg.errors import UserError

try:  # torchvision >= 0.29 deprecates its decoders in favour of TorchCodec; Pillow covers removal
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - depends on the installed torchvision
    decode_image = None

__all__ = ["ImageReadError", "read_image"]

# decode_image warns (twice) on every call since torchvision 0.29; the warning is about the future
# API, not about the image, so exactly that message is silenced around our own calls (the process's
# warning filters are left as they are).
_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision are deprecated"

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_TRUNCATION_HINTS = ("truncated", "incomplete", "out of bound", "premature end")
_MESSAGE = re.compile(r"(.*): cannot read image \((.*)\)", re.DOTALL)


class ImageReadError(UserError, OSError):
    """An image could not be read; ``str(err)`` is ``"{path}: cannot read image ({reason})"``.

    A single-argument call keeps the message as given, so the DataLoader can re-raise the error
    from a worker process with its type intact; the DataLoader's wrapped message ("Caught
    ImageReadError in DataLoader worker ...") is unwrapped back to the one-line original, with
    ``path`` and ``reason`` restored and the worker's traceback as a note.
    """

    def __init__(self, path: str | os.PathLike, reason: str = "") -> None:
        unwrapped = (
            unwrap_worker_message(type(self).__name__, path)
            if not reason and isinstance(path, str)
            else None
        )
        if unwrapped:
            m = _MESSAGE.fullmatch(unwrapped[0])
            path, reason = (m.group(1), m.group(2)) if m else (unwrapped[0], "")
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot read image ({reason})" if reason else self.path)
        if unwrapped:
            self.add_note(unwrapped[1])

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def read_image(path: str | os.PathLike, expected_size: tuple[int, int] | None = None) -> Tensor:
    """Read an image file as RGB.

    Grayscale (+alpha) is replicated to 3 channels, alpha is dropped (not composited), palettes are
    expanded, 16-bit samples are reduced to their high byte, CMYK is converted, and the EXIF
    orientation is applied. Animated images give their first frame.

    Args:
        path: image file.
        expected_size: (height, width) the annotation declares; a mismatch raises.

    Returns:
        (3, H, W) uint8 tensor.

    Raises:
        ImageReadError: file missing/unreadable, undecodable, or of the wrong size.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    header = _header_size(path, data)
    if (
        expected_size is not None
        and header is not None
        and header not in (tuple(expected_size), tuple(expected_size)[::-1])
    ):  # swapped: maybe an EXIF rotation
        _check_size(path, header, tuple(expected_size), what="size")
    image = _decode(path, data)
    if expected_size is not None:
        _check_size(path, tuple(image.shape[-2:]), tuple(expected_size))
    return image


def _read_bytes(path: str) -> bytes:
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    if not os.path.isfile(path):
        raise ImageReadError(path, "not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageReadError(path, e.strerror or str(e)) from None
    if not data:
        raise ImageReadError(path, "empty file")
    return data


def _sniff_format(data: bytes) -> str:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return "unknown format"


def _header_size(path: str, data: bytes) -> tuple[int, int] | None:
    """(H, W) from the file header (before any EXIF rotation), or None when Pillow cannot parse
    it; raises for a decompression bomb."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as pil:
            return pil.height, pil.width
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"too large: {e}") from None
    except Exception:  # not parseable by Pillow: the decoders below report why
        return None


def _decode(path: str, data: bytes) -> Tensor:
    """torchvision first (not for PNGs); Pillow unless torchvision already proved the data truncated."""
    fmt = _sniff_format(data)
    reason = ""
    if decode_image is not None and fmt != "PNG":
        try:
            return _decode_torchvision(data)
        except RuntimeError as e:
            # Messages look like "decode_jpeg, /path/decode_jpeg.cpp:171, Image is incomplete ...".
            detail = re.sub(r"^.*\.cpp:\d+,\s*", "", str(e).strip().splitlines()[0])
            if any(h in detail.lower() for h in _TRUNCATION_HINTS):
                raise ImageReadError(path, f"truncated {fmt}") from None
            reason = (
                f"corrupt {fmt}: {detail}"
                if fmt != "unknown format"
                else "not a recognised image format"
            )
    try:
        return _decode_pil(data)
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        if not reason:
            msg = str(e)
            reason = (
                f"truncated {fmt}"
                if "truncated" in msg.lower()
                else "not a recognised image format"
                if fmt == "unknown format"
                else f"corrupt {fmt}: {msg}"
            )
        raise ImageReadError(path, reason) from None


def _decode_torchvision(data: bytes) -> Tensor:
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
        image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if image.dim() == 4:  # animated GIF: (T, C, H, W)
        image = image[0]
    if image.dtype == torch.uint16:  # 16-bit PNG: keep the high byte (65535 -> 255, 257*k -> k)
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.shape[0] != 3 or image.dtype != torch.uint8:
        raise RuntimeError(f"unexpected decoded layout {tuple(image.shape)} {image.dtype}")
    return image


def _decode_pil(data: bytes) -> Tensor:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as pil:
        pil.load()
        pil = ImageOps.exif_transpose(pil)
        if pil.mode.startswith("I;16") or pil.mode in ("I", "F"):
            # 16/32-bit gray: scale 16-bit ranges to 8 bit, Pillow's convert("RGB") would clip.
            arr = np.asarray(pil).astype(np.float64 if pil.mode == "F" else np.int64)
            # "I;16*" is always 16-bit; "I" (32-bit) is treated as 16-bit when it exceeds 8 bits.
            if pil.mode.startswith("I;16") or (pil.mode == "I" and arr.max(initial=0) > 255):
                arr = arr >> 8
            arr = np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        else:
            arr = np.asarray(pil.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _check_size(
    path: str, got: tuple[int, int], expected: tuple[int, int], *, what: str = "decoded size"
) -> None:
    if got == expected:
        return
    reason = (
        f"{what} {got[0]}x{got[1]} (HxW) does not match the annotation's "
        f"{expected[0]}x{expected[1]}"
    )
    if got == expected[::-1]:
        reason += "; width and height are swapped, probably by the EXIF orientation tag"
    raise ImageReadError(path, reason)
