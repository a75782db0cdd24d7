"""Load images and masks of any PIL mode, and find unreadable files before training starts."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.tv_tensors import Image as ImageTensor
from torchvision.tv_tensors import Mask

from anomalib_adfa.data.errors import CorruptImageError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_UINT16_MAX = 65535.0
_UINT8_MAX = 255.0
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_TAIL_BYTES = 64


def _scale_to_unit(array: np.ndarray, full_range: float) -> np.ndarray:
    """Map a single-channel array to [0, 1] without clipping: by ``full_range`` when it fits, else min-max."""
    low, high = float(array.min()), float(array.max())
    if low >= 0 and high <= full_range:
        return array / full_range
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to a float32 ``H x W x 3`` array in [0, 1]."""
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image, dtype=np.float32) / _UINT16_MAX
    elif image.mode in {"I", "F"}:
        full_range = _UINT16_MAX if image.mode == "I" else 1.0
        gray = _scale_to_unit(np.asarray(image, dtype=np.float64), full_range).astype(np.float32)
    else:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return np.asarray(image.convert("RGB"), dtype=np.float32) / _UINT8_MAX
    return np.repeat(gray[..., None], 3, axis=-1)


def load_image(path: str | Path) -> ImageTensor:
    """Read an image as a 3-channel float tensor in [0, 1], with its EXIF orientation applied.

    Every PIL mode is accepted: grayscale (``L``, ``1``), grayscale with alpha (``LA``), palette
    (``P``), ``RGB``, ``RGBA``, ``CMYK``, 16-bit grayscale (``I;16``) and 32-bit ``I``/``F``. Alpha
    is dropped. 16-bit values are divided by 65535 (scaled, not clipped to 255 as PIL's own
    conversion to RGB would); 32-bit ``I`` images within [0, 65535] are scaled the same way and ``F``
    images within [0, 1] are kept, others are min-max scaled.

    Args:
        path: Image file.

    Returns:
        Tensor of shape ``(3, H, W)``, dtype float32.
    """
    with Image.open(path) as image:
        array = _to_rgb_array(ImageOps.exif_transpose(image))
    return ImageTensor(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))))


def load_mask(paths: Sequence[str | Path], size: tuple[int, int]) -> Mask:
    """Read the union of several mask files: a pixel is anomalous when it is non-zero in any of them.

    Args:
        paths: Mask files (any PIL mode; each is converted to ``L`` and thresholded at > 0).
        size: Expected ``(height, width)``, the image's.

    Returns:
        ``uint8`` mask of shape ``(H, W)`` with values 0 and 1.

    Raises:
        ValueError: When a mask's size differs from the image's.
    """
    union = np.zeros(size, dtype=bool)
    for path in paths:
        with Image.open(path) as mask_file:
            mask = np.asarray(ImageOps.exif_transpose(mask_file).convert("L")) > 0
        if mask.shape != union.shape:
            msg = f"mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image is {size[1]}x{size[0]}"
            raise ValueError(msg)
        union |= mask
    return Mask(torch.from_numpy(union).to(torch.uint8))


def _tail(path: Path) -> bytes:
    with path.open("rb") as file:
        file.seek(0, 2)
        file.seek(max(0, file.tell() - _TAIL_BYTES))
        return file.read()


def _ends_cleanly(path: Path, image_format: str | None) -> bool:
    """Cheap completeness test from the file's last bytes (or, for BMP, its declared size)."""
    if image_format in {"JPEG", "MPO"}:
        return _tail(path).rstrip(b"\x00\r\n ").endswith(_JPEG_END)
    if image_format == "PNG":
        return _tail(path).endswith(_PNG_END)
    if image_format == "BMP":
        with path.open("rb") as file:
            header = file.read(6)
        declared = struct.unpack("<I", header[2:6])[0] if len(header) == 6 else 0
        return 0 < declared <= path.stat().st_size
    return False


def image_problem(path: Path) -> str | None:
    """Describe why an image file cannot be used, or return ``None`` when it looks fine.

    The header is always parsed. The pixel data is decoded only when the file's end does not look
    complete (no JPEG end-of-image marker, no PNG ``IEND`` chunk, a BMP shorter than its header says,
    or another format), which keeps the check fast while catching truncated downloads.

    Args:
        path: Image or mask file.

    Returns:
        The decoder's complaint, or ``None``.
    """
    try:
        with Image.open(path) as image:
            if not _ends_cleanly(path, image.format):
                image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_readable(paths: Iterable[Path]) -> None:
    """Check that every file can be read, and report all the bad ones at once.

    Args:
        paths: Image and mask files.

    Raises:
        CorruptImageError: Listing every unreadable file with its path.
    """
    problems = [(path, problem) for path in paths if (problem := image_problem(path)) is not None]
    if not problems:
        return
    lines = [f"  {path}: {problem}" for path, problem in problems]
    msg = (
        f"{len(problems)} image file(s) cannot be read (corrupt, truncated or not an image); "
        "re-download or remove them before training:\n" + "\n".join(lines)
    )
    raise CorruptImageError(msg)
