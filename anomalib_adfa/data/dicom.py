"""Read DICOM pixel data as displayed intensities in [0, 1], the way a DICOM viewer would show them.

The grey-level pipeline follows DICOM PS3.3 C.11 (and PS3.4 N.2), each step done by pydicom:

1. decode the stored values (``BitsStored`` respected, signed values sign-extended), one frame;
2. modality LUT (:func:`pydicom.pixels.apply_modality_lut`): ``Rescale Slope / Intercept`` or a
   Modality LUT Sequence, giving e.g. Hounsfield units;
3. VOI: a VOI LUT Sequence (:func:`pydicom.pixels.apply_voi_lut`) or a Window Center / Width
   (:func:`pydicom.pixels.apply_windowing`, which also does ``LINEAR_EXACT`` and ``SIGMOID``).
   The output is scaled to [0, 1]: for the default ``LINEAR`` function a value at or below the
   window's lower edge ``c - 0.5 - (w - 1) / 2`` is 0, one above its upper edge ``c - 0.5 + (w - 1) / 2``
   is 1, and values in between are linear. Without a window (or with ``window="full"``) the whole
   range the modality LUT can produce from ``BitsStored`` bits maps linearly onto [0, 1];
4. ``MONOCHROME1`` (white = low) is inverted, ``y -> 1 - y``, so that it looks like ``MONOCHROME2``.

Colour images (``RGB``, the ``YBR_*`` family, ``PALETTE COLOR``) are converted to RGB by pydicom and
divided by their full range; they have no VOI step. Multi-frame images need an explicit frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    from pydicom.dataset import Dataset

DICOM_MAGIC = b"DICM"
_MAGIC_OFFSET = 128
DICOM_EXTRA = 'pip install "anomalib-adfa[dicom]"'
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
# What pydicom's decoders turn into RGB by default (``as_rgb=True`` knows whether a JPEG codec already did).
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})


class DicomReadError(ValueError):
    """A DICOM file cannot be turned into an image; the message says why (without the path)."""


@dataclass(frozen=True)
class ReadOptions:
    """How DICOM pixel data become intensities; other formats ignore these options.

    Args:
        window: Which VOI transform of the file to apply: the index of its VOI LUT or of its Window
            Center / Width pair (0, the first, by default; a file with fewer is an error), or ``"full"``
            to ignore them and map the full modality range onto [0, 1].
        window_center: Window centre to use instead of the file's (with ``window_width``), in modality
            units (e.g. HU).
        window_width: Window width to use instead of the file's (with ``window_center``).
        frame: Frame of a multi-frame file (0-based). Multi-frame files are refused without one.

    Raises:
        ValueError: When only one of ``window_center`` and ``window_width`` is given, the width is not
            positive, or an index is negative.
    """

    window: int | Literal["full"] = 0
    window_center: float | None = None
    window_width: float | None = None
    frame: int | None = None

    def __post_init__(self) -> None:
        if (self.window_center is None) != (self.window_width is None):
            msg = "give window_center and window_width together, or neither"
            raise ValueError(msg)
        if self.window_width is not None and self.window_width <= 0:
            msg = f"window_width must be positive, got {self.window_width}"
            raise ValueError(msg)
        if self.window != "full" and (not isinstance(self.window, int) or self.window < 0):
            msg = f"window must be a non-negative index or 'full', got {self.window!r}"
            raise ValueError(msg)
        if self.frame is not None and self.frame < 0:
            msg = f"frame must be non-negative, got {self.frame}"
            raise ValueError(msg)


def is_dicom(path: Path) -> bool:
    """Return whether a file carries the DICOM Part 10 marker ``DICM`` at byte 128, whatever its name."""
    try:
        with path.open("rb") as file:
            file.seek(_MAGIC_OFFSET)
            return file.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError:
        return False


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as error:
        msg = f"reading DICOM needs pydicom: {DICOM_EXTRA}"
        raise DicomReadError(msg) from error
    return pydicom


def _check_decodable(dataset: Dataset) -> None:
    from pydicom.pixels import get_decoder

    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as error:
        msg = f"no pydicom decoder exists for transfer syntax {syntax.name} ({syntax})"
        raise DicomReadError(msg) from error
    if not decoder.is_available:
        msg = (
            f"pixel data are compressed as {syntax.name} ({syntax}) and no installed decoder reads it; "
            f"install the DICOM decoders with {DICOM_EXTRA}"
        )
        raise DicomReadError(msg)


def _frame_index(dataset: Dataset, frame: int | None) -> int | None:
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1 and frame is None:
        msg = f"multi-frame image ({frames} frames); choose one with the frame option (0 to {frames - 1})"
        raise DicomReadError(msg)
    if frame is not None and frame >= frames:
        msg = f"frame {frame} requested but the image has {frames} frame(s)"
        raise DicomReadError(msg)
    return frame if frames > 1 else None


def _modality_range(dataset: Dataset) -> tuple[float, float]:
    """Lowest and highest value the modality LUT produces from any value ``BitsStored`` bits can hold."""
    from pydicom.pixels import apply_modality_lut

    bits = int(dataset.BitsStored)
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    # A rescale is linear, so its extremes are at the ends; a Modality LUT Sequence need not be monotonic.
    stored = np.arange(low, high + 1) if "ModalityLUTSequence" in dataset else np.array([low, high])
    values = apply_modality_lut(stored, dataset)
    return float(values.min()), float(values.max())


def _as_list(value: Any) -> list[float]:
    from pydicom.multival import MultiValue

    if value is None:
        return []
    return [float(v) for v in value] if isinstance(value, MultiValue) else [float(value)]


def _unit_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _window_dataset(center: float, width: float, function: str) -> Dataset:
    """Build a stand-in dataset holding one window, with a 1-bit unsigned output so windowing yields [0, 1]."""
    from pydicom.dataset import Dataset

    window = Dataset()
    window.WindowCenter = center
    window.WindowWidth = width
    window.VOILUTFunction = function
    window.PhotometricInterpretation = "MONOCHROME2"  # the inversion of MONOCHROME1 comes after the VOI
    window.BitsStored = 1
    window.PixelRepresentation = 0
    return window


def _voi(dataset: Dataset, values: np.ndarray, options: ReadOptions) -> np.ndarray:
    """Apply the chosen VOI transform to modality values; returns float64 in [0, 1]."""
    from pydicom.pixels import apply_voi_lut, apply_windowing

    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if options.window_center is not None and options.window_width is not None:
        return apply_windowing(values, _window_dataset(options.window_center, options.window_width, function))
    lut_count = len(dataset.get("VOILUTSequence", []))
    windows = min(len(_as_list(dataset.get("WindowCenter"))), len(_as_list(dataset.get("WindowWidth"))))
    index = options.window
    if index not in (0, "full") and lut_count == 0 and windows == 0:
        msg = f"window {index} requested but the file has no VOI LUT or Window Center/Width"
        raise DicomReadError(msg)
    if index == "full" or (lut_count == 0 and windows == 0):
        return _unit_range(values.astype(np.float64), *_modality_range(dataset))
    if lut_count:
        if index >= lut_count:
            msg = f"VOI LUT {index} requested but the file has {lut_count}"
            raise DicomReadError(msg)
        lut = dataset.VOILUTSequence[index]
        bits = int(lut.LUTDescriptor[2])
        return apply_voi_lut(values, dataset, index=index, prefer_lut=True).astype(np.float64) / (2**bits - 1)
    if index >= windows:
        msg = f"window {index} requested but the file has {windows} Window Center/Width pair(s)"
        raise DicomReadError(msg)
    center, width = _as_list(dataset.WindowCenter)[index], _as_list(dataset.WindowWidth)[index]
    return apply_windowing(values, _window_dataset(center, width, function))


def _grey(dataset: Dataset, stored: np.ndarray, options: ReadOptions) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    intensities = _voi(dataset, apply_modality_lut(stored, dataset), options)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        intensities = 1.0 - intensities
    return np.repeat(intensities[..., None], 3, axis=-1)


def _palette(dataset: Dataset, stored: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
    return apply_color_lut(stored, dataset).astype(np.float64) / (2**bits - 1)


def read_dicom(path: Path, options: ReadOptions | None = None) -> np.ndarray:
    """Read one DICOM image as displayed intensities (see the module docstring for the pipeline).

    Args:
        path: DICOM Part 10 file (any name).
        options: Window and frame choices; defaults to the first window and single-frame files.

    Returns:
        float32 array of shape ``(H, W, 3)`` in [0, 1].

    Raises:
        DicomReadError: When pydicom is missing, the file is not DICOM or is truncated, has no pixel data,
            is compressed in a syntax no installed decoder reads, is multi-frame without a frame choice,
            or has a photometric interpretation other than MONOCHROME1/2, RGB, YBR_* or PALETTE COLOR.
    """
    options = options or ReadOptions()
    pydicom = _pydicom()
    if not is_dicom(path):
        msg = f"not a DICOM file: no {DICOM_MAGIC.decode()!r} marker at byte {_MAGIC_OFFSET}"
        raise DicomReadError(msg)
    try:
        dataset = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError) as error:
        msg = f"not a readable DICOM file ({type(error).__name__}: {error})"
        raise DicomReadError(msg) from error
    if "PixelData" not in dataset:
        sop_class = dataset.get("SOPClassUID")
        kind = f" ({sop_class.name})" if sop_class is not None else ""
        msg = f"DICOM object without pixel data{kind}; only images can be scored"
        raise DicomReadError(msg)
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if photometric not in _MONOCHROME | _COLOUR | {"PALETTE COLOR"}:
        msg = (
            f"unsupported photometric interpretation {photometric!r} "
            "(supported: MONOCHROME1, MONOCHROME2, RGB, YBR_*, PALETTE COLOR)"
        )
        raise DicomReadError(msg)
    _check_decodable(dataset)
    frame = _frame_index(dataset, options.frame)
    try:
        dataset.pixel_array_options(index=frame)
        stored = dataset.pixel_array
    except (ValueError, RuntimeError, EOFError, OSError) as error:
        msg = f"pixel data cannot be decoded, the file may be truncated ({type(error).__name__}: {error})"
        raise DicomReadError(msg) from error
    if stored.ndim != (2 if photometric in _MONOCHROME | {"PALETTE COLOR"} else 3):
        msg = f"pixel array of shape {stored.shape} does not match {photometric} and one frame"
        raise DicomReadError(msg)
    if photometric in _MONOCHROME:
        image = _grey(dataset, stored, options)
    elif photometric == "PALETTE COLOR":
        _refuse_window_options(photometric, options)
        image = _palette(dataset, stored)
    else:
        _refuse_window_options(photometric, options)
        image = stored.astype(np.float64) / (2 ** int(dataset.BitsStored) - 1)
    return image.astype(np.float32)


def _refuse_window_options(photometric: str, options: ReadOptions) -> None:
    """Colour images have no VOI step: a window asked for would be ignored, so it is an error."""
    if options.window_center is not None or options.window not in (0, "full"):
        msg = f"{photometric} image: window options apply to grey-level (MONOCHROME1/2) images only"
        raise DicomReadError(msg)


def dicom_problem(path: Path, options: ReadOptions | None = None) -> str | None:
    """Describe why a DICOM file cannot be read with these options (a full read), or return ``None``."""
    try:
        read_dicom(path, options)
    except DicomReadError as error:
        return str(error)
    return None
