"""Generated copies of the BUSI and SIPaKMeD download layouts, with tiny images and the full paper counts."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BUSI_COUNTS = {"normal": 133, "benign": 437, "malignant": 210}
BUSI_EXTRA_MASKS = {"benign (100)": 1, "benign (163)": 2, "malignant (53)": 1}
SIPAKMED_COUNTS = {
    "im_Parabasal": 108,
    "im_Superficial-Intermediate": 126,
    "im_Dyskeratotic": 223,
    "im_Koilocytotic": 238,
    "im_Metaplastic": 9,
}
SIPAKMED_NESTED = ("im_Parabasal", "im_Koilocytotic")


def encode(image: Image.Image, image_format: str) -> bytes:
    """Encode a PIL image in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def pixels(rows: slice, cols: slice, size: int = 8) -> np.ndarray:
    """Boolean ``size x size`` array that is true on ``[rows, cols]``."""
    array = np.zeros((size, size), dtype=bool)
    array[rows, cols] = True
    return array


# Tiny files shared by all generated images: an RGB image, a 1-bit lesion mask, a second lesion mask
# overlapping it, and an empty 8-bit RGB mask like the real BUSI normal masks.
RGB_PNG = encode(Image.fromarray(np.arange(192, dtype=np.uint8).reshape(8, 8, 3)), "PNG")
LESION_MASK = pixels(slice(1, 4), slice(1, 4))
SECOND_MASK = pixels(slice(3, 7), slice(3, 7))
LESION_PNG = encode(Image.fromarray(LESION_MASK).convert("1"), "PNG")
SECOND_PNG = encode(Image.fromarray(SECOND_MASK).convert("1"), "PNG")
EMPTY_RGB_MASK_PNG = encode(Image.new("RGB", (8, 8)), "PNG")
BMP = encode(Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)), "BMP")


def add_clutter(folder: Path) -> None:
    """Add the files operating systems and archives leave behind."""
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "notes.csv").write_text("file,label\n")


def make_busi(root: Path, counts: dict[str, int] | None = None, masks: bool = True) -> Path:
    """Write a BUSI download: ``Dataset_BUSI_with_GT/{normal,benign,malignant}`` with masks beside the images.

    Every fifth image has an upper-case ``.PNG`` extension; the images in ``BUSI_EXTRA_MASKS`` get extra
    ``_mask_N`` files; a ``__MACOSX`` copy and clutter files sit around the real folders.

    Returns:
        The ``Dataset_BUSI_with_GT`` folder.
    """
    dataset = root / "Dataset_BUSI_with_GT"
    for label, count in (counts or BUSI_COUNTS).items():
        folder = dataset / label
        folder.mkdir(parents=True)
        add_clutter(folder)
        for index in range(1, count + 1):
            stem = f"{label} ({index})"
            (folder / f"{stem}{'.PNG' if index % 5 == 0 else '.png'}").write_bytes(RGB_PNG)
            if not masks:
                continue
            (folder / f"{stem}_mask.png").write_bytes(EMPTY_RGB_MASK_PNG if label == "normal" else LESION_PNG)
            for extra in range(1, BUSI_EXTRA_MASKS.get(stem, 0) + 1):
                (folder / f"{stem}_mask_{extra}.png").write_bytes(SECOND_PNG)
    macosx = root / "__MACOSX" / "Dataset_BUSI_with_GT" / "benign"
    macosx.mkdir(parents=True)
    (macosx / "._benign (1).png").write_bytes(b"\0\5\26\7")
    (root / "Dataset_BUSI_with_GT.csv").write_text("image,label\n")
    return dataset


def make_sipakmed(root: Path, counts: dict[str, int] | None = None) -> Path:
    """Write a SIPaKMeD download: five ``im_*`` folders of cluster BMPs with ``CROPPED/`` crops and ``.dat`` files.

    The folders in ``SIPAKMED_NESTED`` are nested twice (``im_X/im_X/``); every seventh image has an
    upper-case ``.BMP`` extension.

    Returns:
        ``root``.
    """
    for label, count in (counts or SIPAKMED_COUNTS).items():
        folder = root / label / label if label in SIPAKMED_NESTED else root / label
        (folder / "CROPPED").mkdir(parents=True)
        add_clutter(folder)
        for index in range(1, count + 1):
            (folder / f"{index:03d}{'.BMP' if index % 7 == 0 else '.bmp'}").write_bytes(BMP)
            (folder / "CROPPED" / f"{index:03d}_01.bmp").write_bytes(BMP)
            (folder / f"{index:03d}_cyt01.dat").write_text("1.0 2.0\n")
            (folder / f"{index:03d}_nuc01.dat").write_text("1.0 2.0\n")
    return root


@pytest.fixture(scope="session")
def busi_full_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated BUSI download with the full counts (133 normal, 437 benign, 210 malignant); the parent folder."""
    root = tmp_path_factory.mktemp("busi_download")
    make_busi(root)
    return root


@pytest.fixture(scope="session")
def sipakmed_full_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated SIPaKMeD download with the full normal and abnormal counts (108 + 126, 223 + 238)."""
    return make_sipakmed(tmp_path_factory.mktemp("sipakmed_download"))


@pytest.fixture
def busi_factory() -> Callable[..., Path]:
    """:func:`make_busi`, for tests that need their own BUSI tree."""
    return make_busi


@pytest.fixture
def sipakmed_factory() -> Callable[..., Path]:
    """:func:`make_sipakmed`, for tests that need their own SIPaKMeD tree."""
    return make_sipakmed


@pytest.fixture
def generated_lesion_masks() -> tuple[np.ndarray, np.ndarray]:
    """The two lesion masks the generated BUSI trees use (``_mask`` and ``_mask_N``)."""
    return LESION_MASK, SECOND_MASK
