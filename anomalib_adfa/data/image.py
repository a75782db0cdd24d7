"""The one image reader: DICOM, 16-bit and 8-bit images and masks, and the check for unreadable files.

Every datamodule, the prediction dataset and the exported-model predictor read images through
:func:`load_image`. A file is DICOM when it carries the ``DICM`` marker at byte 128, whatever its name
(see :mod:`.dicom`); other files are read with PIL.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.tv_tensors import Image as ImageTensor
from torchvision.tv_tensors import Mask

from anomalib_adfa.data.dicom import DicomReadError, ReadOptions, dicom_problem, is_dicom, read_dicom
from anomalib_adfa.data.errors import CorruptImageError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_UINT16_MAX = 65535.0
_UINT8_MAX = 255.0
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_TAIL_BYTES = 64
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


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


def read_image_array(path: str | Path, options: ReadOptions | None = None) -> np.ndarray:
    """Read an image as a float32 ``H x W x 3`` array in [0, 1]; see :func:`load_image`.

    Raises:
        CorruptImageError: When a DICOM file (or a file named ``.dcm``/``.dicom``) cannot be read; the
            message names the file and the problem.
    """
    path = Path(path)
    if is_dicom(path) or path.suffix.lower() in DICOM_EXTENSIONS:
        try:
            return read_dicom(path, options)
        except DicomReadError as error:
            msg = f"{path}: {error}"
            raise CorruptImageError(msg) from error
    with Image.open(path) as image:
        return _to_rgb_array(ImageOps.exif_transpose(image))


def load_image(path: str | Path, options: ReadOptions | None = None) -> ImageTensor:
    """Read an image as a 3-channel float tensor in [0, 1].

    DICOM files (detected by content) go through the modality LUT, the VOI LUT or window and the
    MONOCHROME1 inversion (:mod:`.dicom`), as chosen by ``options``. Other files are read with PIL, with
    their EXIF orientation applied; every PIL mode is accepted: grayscale (``L``, ``1``), grayscale with
    alpha (``LA``), palette (``P``), ``RGB``, ``RGBA``, ``CMYK``, 16-bit grayscale (``I;16``) and 32-bit
    ``I``/``F``. Alpha is dropped. 16-bit values are divided by 65535 (scaled, not clipped to 255 as
    PIL's own conversion to RGB would); 32-bit ``I`` images within [0, 65535] are scaled the same way
    and ``F`` images within [0, 1] are kept, others are min-max scaled.

    Args:
        path: Image file.
        options: DICOM window and frame choices (ignored for other formats).

    Returns:
        Tensor of shape ``(3, H, W)``, dtype float32.

    Raises:
        CorruptImageError: When a DICOM file cannot be read.
    """
    array = read_image_array(path, options)
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


def image_problem(path: Path, options: ReadOptions | None = None) -> str | None:
    """Describe why an image file cannot be used, or return ``None`` when it looks fine.

    DICOM files are read in full with ``options`` (so a wrong frame or window choice is found too). For
    other files the header is always parsed and the pixel data are decoded only when the file's end
    does not look complete (no JPEG end-of-image marker, no PNG ``IEND`` chunk, a BMP shorter than its
    header says, or another format), which keeps the check fast while catching truncated downloads.

    Args:
        path: Image or mask file.
        options: DICOM window and frame choices.

    Returns:
        The decoder's complaint, or ``None``.
    """
    if is_dicom(path) or path.suffix.lower() in DICOM_EXTENSIONS:
        return dicom_problem(path, options)
    try:
        with Image.open(path) as image:
            if not _ends_cleanly(path, image.format):
                image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        return f"{type(error).__name__}: {error}"
    return None


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of a readable image as :func:`load_image` returns it, from its header."""
    if is_dicom(path):
        from pydicom import dcmread

        header = dcmread(path, stop_before_pixels=True)
        return int(header.Rows), int(header.Columns)
    with Image.open(path) as image:
        width, height = image.size
        transposed = image.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING_ORIENTATIONS
    return (width, height) if transposed else (height, width)


def _mask_problems(masks: Mapping[Path, Sequence[Path]], unreadable: set[Path]) -> list[tuple[Path, str]]:
    problems = []
    for image, mask_paths in masks.items():
        if image in unreadable:
            continue
        height, width = image_size(image)
        for mask in mask_paths:
            if mask in unreadable:
                continue
            mask_height, mask_width = image_size(mask)
            if (mask_height, mask_width) != (height, width):
                problem = f"mask is {mask_width}x{mask_height} pixels but its image {image.name} is {width}x{height}"
                problems.append((mask, problem))
    return problems


def check_options_apply(paths: Sequence[Path], options: ReadOptions | None) -> None:
    """Refuse DICOM read options when no image is DICOM: they would change nothing, silently.

    Raises:
        ValueError: When ``options`` differ from the defaults and none of ``paths`` is a DICOM file.
    """
    if options is None or options == ReadOptions() or any(is_dicom(path) for path in paths):
        return
    msg = f"DICOM read options {options} were given but none of the {len(paths)} image(s) is DICOM"
    raise ValueError(msg)


def check_readable(
    paths: Iterable[Path],
    options: ReadOptions | None = None,
    masks: Mapping[Path, Sequence[Path]] | None = None,
) -> None:
    """Check that every file can be read and every mask fits its image, and report all the bad ones at once.

    Args:
        paths: Image and mask files.
        options: DICOM window and frame choices.
        masks: The mask files of each image, to compare sizes.

    Raises:
        CorruptImageError: Listing every unreadable file, and every mask of the wrong size, with its path.
    """
    problems = [(path, problem) for path in paths if (problem := image_problem(path, options)) is not None]
    problems += _mask_problems(masks or {}, {path for path, _ in problems})
    if not problems:
        return
    lines = [f"  {path}: {problem}" for path, problem in problems]
    msg = (
        f"{len(problems)} image file(s) cannot be read (corrupt, truncated, not an image or not usable as "
        "they are); fix or remove them:\n" + "\n".join(lines)
    )
    raise CorruptImageError(msg)
