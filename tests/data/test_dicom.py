"""The DICOM path of the one image reader: each LUT step against a hand computation, colour, frames, bad files.

Fixtures are built with pydicom from real chest X-rays (Covid, ``../shared/data``), or from the synthetic head
phantoms when the real images are absent, and taken from pydicom's bundled test files.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_adfa.data import CorruptImageError, ReadOptions, load_image
from anomalib_adfa.data.image import check_readable

pydicom = pytest.importorskip("pydicom", reason="the dicom extra is not installed: pip install 'anomalib-adfa[dicom]'")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import convert_color_space  # noqa: E402
from pydicom.uid import RLELossless  # noqa: E402

STORED_MAX = 4095  # 12 bits
SLOPE, INTERCEPT = 2.0, -1024.0
CENTERS, WIDTHS = [1000.0, 3000.0], [2001.0, 801.0]


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom's bundled test file {name} is missing"
    return Path(path)


@pytest.fixture
def stored_12bit(grey_slices: list[np.ndarray]) -> np.ndarray:
    """A 12-bit image using the whole range: 16 x the 8-bit grey value plus a low-bit ramp."""
    grey = grey_slices[0].astype(np.uint16)
    return grey * 16 + (np.arange(grey.size, dtype=np.uint16).reshape(grey.shape) % 16)


def linear_voi(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 with output range [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def grey_channel(path: Path, **options: object) -> np.ndarray:
    image = load_image(path, ReadOptions(**options))
    assert image.shape[0] == 3
    assert image.dtype == torch.float32
    torch.testing.assert_close(image[0], image[1], rtol=0, atol=0)
    torch.testing.assert_close(image[0], image[2], rtol=0, atol=0)
    return image[0].numpy().astype(np.float64)


def test_each_lut_step_matches_a_hand_computation(
    stored_12bit: np.ndarray, dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    path = dicom_writer(
        tmp_path / "ct.dcm",
        stored_12bit,
        bits_stored=12,
        RescaleSlope=SLOPE,
        RescaleIntercept=INTERCEPT,
        WindowCenter=CENTERS,
        WindowWidth=WIDTHS,
    )
    modality = stored_12bit * SLOPE + INTERCEPT
    low, high = INTERCEPT, STORED_MAX * SLOPE + INTERCEPT
    # Full range: the modality LUT alone, mapped linearly from what 12 bits can give.
    np.testing.assert_allclose(grey_channel(path, window="full"), (modality - low) / (high - low), atol=1e-6)
    # The first window by default, the second on request, and an explicit one.
    first = linear_voi(modality, CENTERS[0], WIDTHS[0])
    assert 0.05 < (first == 0).mean() + (first == 1).mean() < 0.95, "the window should clip some pixels, not all"
    np.testing.assert_allclose(grey_channel(path), first, atol=1e-6)
    np.testing.assert_allclose(grey_channel(path, window=1), linear_voi(modality, CENTERS[1], WIDTHS[1]), atol=1e-6)
    np.testing.assert_allclose(
        grey_channel(path, window_center=40.0, window_width=400.0), linear_voi(modality, 40.0, 400.0), atol=1e-6
    )
    # The window's lower edge reads 0 and its upper edge 1.
    lower, upper = CENTERS[0] - 0.5 - (WIDTHS[0] - 1) / 2, CENTERS[0] - 0.5 + (WIDTHS[0] - 1) / 2
    assert linear_voi(np.array([lower, upper]), CENTERS[0], WIDTHS[0]).tolist() == [0.0, 1.0]
    with pytest.raises(CorruptImageError, match=r"ct\.dcm: window 2 requested but the file has 2"):
        load_image(path, ReadOptions(window=2))


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("LINEAR_EXACT", lambda x, c, w: np.clip((x - c) / w + 0.5, 0.0, 1.0)),
        ("SIGMOID", lambda x, c, w: 1 / (1 + np.exp(-4 * (x - c) / w))),
    ],
)
def test_other_voi_functions_follow_the_standard(
    function: str,
    expected: Callable[[np.ndarray, float, float], np.ndarray],
    stored_12bit: np.ndarray,
    dicom_writer: Callable[..., Path],
    tmp_path: Path,
) -> None:
    path = dicom_writer(
        tmp_path / "voi.dcm", stored_12bit, bits_stored=12, WindowCenter=2000, WindowWidth=1500, VOILUTFunction=function
    )
    np.testing.assert_allclose(grey_channel(path), expected(stored_12bit.astype(np.float64), 2000, 1500), atol=1e-6)


def test_signed_pixels_and_no_window_use_the_full_modality_range(
    stored_12bit: np.ndarray, dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    signed = (stored_12bit.astype(np.int32) - 2048).astype(np.int16)
    path = dicom_writer(tmp_path / "signed.dcm", signed, bits_stored=12, RescaleSlope=0.5, RescaleIntercept=10.0)
    modality = signed * 0.5 + 10.0
    low, high = -2048 * 0.5 + 10.0, 2047 * 0.5 + 10.0
    np.testing.assert_allclose(grey_channel(path), (modality - low) / (high - low), atol=1e-6)


def test_bits_above_bits_stored_are_ignored(
    stored_12bit: np.ndarray, dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    # Overlay bits left in the top nibble must not change the image.
    path = dicom_writer(tmp_path / "overlay.dcm", stored_12bit | 0xF000, BitsStored=12, HighBit=11)
    np.testing.assert_allclose(grey_channel(path), stored_12bit / STORED_MAX, atol=1e-6)


def test_monochrome1_copy_reads_like_its_monochrome2_original(
    stored_12bit: np.ndarray, dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    original = dicom_writer(tmp_path / "m2.dcm", stored_12bit, bits_stored=12, WindowCenter=1800, WindowWidth=2500)
    # White = low: stored values mirrored, and the window mirrored with them (c' = 4096 - c for the linear VOI).
    inverted = STORED_MAX - stored_12bit
    copy = dicom_writer(
        tmp_path / "m1.dcm", inverted, "MONOCHROME1", bits_stored=12, WindowCenter=4096 - 1800, WindowWidth=2500
    )
    torch.testing.assert_close(load_image(copy), load_image(original), rtol=0, atol=1e-6)
    full = {"window": "full"}
    torch.testing.assert_close(load_image(copy, ReadOptions(**full)), load_image(original, ReadOptions(**full)))
    assert load_image(original).std() > 0.1


def test_rgb_and_ybr_are_converted_to_rgb(
    grey_slices: list[np.ndarray], dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    rgb = np.stack([grey_slices[0], grey_slices[1], 255 - grey_slices[0]], axis=-1)
    expected = torch.from_numpy(rgb.transpose(2, 0, 1) / 255).float()
    torch.testing.assert_close(load_image(dicom_writer(tmp_path / "rgb.dcm", rgb, "RGB")), expected)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    from_ybr = load_image(dicom_writer(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    assert (from_ybr - expected).abs().max() <= 3 / 255  # 8-bit rounding in each direction


def test_rle_compressed_copy_reads_like_the_original(
    stored_12bit: np.ndarray, dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    original = dicom_writer(tmp_path / "raw.dcm", stored_12bit, bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    compressed = dicom_writer(
        tmp_path / "rle.dcm", stored_12bit, bits_stored=12, compress=RLELossless, WindowCenter=2000, WindowWidth=3000
    )
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == RLELossless
    torch.testing.assert_close(load_image(compressed), load_image(original), rtol=0, atol=0)


def test_dicom_is_recognised_by_content_whatever_its_name(
    stored_12bit: np.ndarray, dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    named = dicom_writer(tmp_path / "slice.dcm", stored_12bit, bits_stored=12)
    unnamed = tmp_path / "IM000001"
    unnamed.write_bytes(named.read_bytes())
    torch.testing.assert_close(load_image(unnamed), load_image(named))


def test_multi_frame_needs_a_frame(
    grey_slices: list[np.ndarray], dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    frames = np.stack([grey_slices[0], grey_slices[1]])
    path = dicom_writer(tmp_path / "cine.dcm", frames)
    with pytest.raises(CorruptImageError, match=r"cine\.dcm: multi-frame image \(2 frames\); choose one"):
        load_image(path)
    np.testing.assert_allclose(grey_channel(path, frame=1), grey_slices[1] / 255, atol=1e-6)
    with pytest.raises(CorruptImageError, match=r"frame 2 requested but the image has 2 frame"):
        load_image(path, ReadOptions(frame=2))


@pytest.mark.parametrize(
    "compressed",
    ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"],
)
def test_bundled_lossless_copies_read_like_the_uncompressed_file(compressed: str) -> None:
    torch.testing.assert_close(load_image(bundled(compressed)), load_image(bundled("MR_small.dcm")))


def test_bundled_files_follow_pydicoms_own_luts() -> None:
    from pydicom.pixels import apply_modality_lut, apply_windowing

    mr = pydicom.dcmread(bundled("MR_small.dcm"))  # window 600 / 1600, no rescale
    expected = linear_voi(mr.pixel_array.astype(np.float64), 600, 1600)
    np.testing.assert_allclose(grey_channel(bundled("MR_small.dcm")), expected, atol=1e-6)
    windowed = apply_windowing(mr.pixel_array, mr)  # pydicom's own output range: signed 16-bit
    np.testing.assert_allclose(grey_channel(bundled("MR_small.dcm")), (windowed + 32768) / 65535, atol=1e-6)
    ct = pydicom.dcmread(bundled("CT_small.dcm"))  # signed 16-bit, rescale 1 / -1024, no window: full range
    hu = apply_modality_lut(ct.pixel_array, ct)
    low = -32768 - 1024
    np.testing.assert_allclose(grey_channel(bundled("CT_small.dcm")), (hu - low) / 65535, atol=1e-6)


def test_bundled_colour_files_read_as_rgb() -> None:
    ybr = load_image(bundled("SC_ybr_full_422_uncompressed.dcm"))
    rgb = pydicom.dcmread(bundled("SC_ybr_full_422_uncompressed.dcm")).pixel_array  # pydicom's YBR -> RGB
    torch.testing.assert_close(ybr, torch.from_numpy(rgb.transpose(2, 0, 1) / 255).float())
    palette = load_image(bundled("examples_palette.dcm"))
    assert palette.shape[0] == 3
    assert 0 <= palette.min() < palette.max() <= 1
    first_frame = load_image(bundled("SC_rgb_rle_2frame.dcm"), ReadOptions(frame=0))
    assert first_frame.shape[0] == 3


def test_every_bad_dicom_is_named_with_its_problem_at_once(
    stored_12bit: np.ndarray, dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    good = dicom_writer(tmp_path / "good.dcm", stored_12bit, bits_stored=12)
    report = tmp_path / "report.dcm"
    report.write_bytes(bundled("test-SR.dcm").read_bytes())
    not_dicom = tmp_path / "png_in_disguise.dcm"
    Image.fromarray(stored_12bit.astype(np.uint8)).save(not_dicom, format="PNG")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    hsv = dicom_writer(tmp_path / "hsv.dcm", stored_12bit, bits_stored=12, PhotometricInterpretation="HSV")
    cine = dicom_writer(tmp_path / "cine.dcm", np.stack([stored_12bit, stored_12bit]), bits_stored=12)
    bundled_truncated = tmp_path / "MR_truncated.dcm"
    bundled_truncated.write_bytes(bundled("MR_truncated.dcm").read_bytes())
    bad = [report, not_dicom, truncated, hsv, cine, bundled_truncated]

    with pytest.raises(CorruptImageError) as error:
        check_readable([good, *bad])
    message = str(error.value)
    assert message.startswith(f"{len(bad)} image file(s) cannot be read")
    assert str(good) not in message
    lines = {Path(line.strip().split(": ", 1)[0]): line for line in message.splitlines()[1:]}
    assert set(lines) == set(bad)
    assert "DICOM object without pixel data (Comprehensive SR Storage)" in lines[report]
    assert "not a DICOM file: no 'DICM' marker at byte 128" in lines[not_dicom]
    assert "truncated" in lines[truncated]
    assert "truncated" in lines[bundled_truncated]
    assert "unsupported photometric interpretation 'HSV'" in lines[hsv]
    assert "multi-frame image (2 frames)" in lines[cine]
    for path in bad:  # and each one alone, through the reader
        with pytest.raises(CorruptImageError, match=str(path.name)):
            load_image(path)


def test_missing_decoder_names_the_extra_to_install() -> None:
    # A process where the pylibjpeg plugins cannot be imported: JPEG-LS then has no decoder (Pillow has none).
    script = textwrap.dedent(
        """
        import sys
        for name in ("pylibjpeg", "libjpeg", "openjpeg", "rle"):
            sys.modules[name] = None
        from pydicom.data import get_testdata_file
        from anomalib_adfa.data.image import load_image
        load_image(get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("anomalib_adfa.data.errors.CorruptImageError: ")
    assert "MR_small_jpeg_ls_lossless.dcm: pixel data are compressed as JPEG-LS Lossless" in last
    assert 'pip install "anomalib-adfa[dicom]"' in last


def test_read_options_are_checked() -> None:
    with pytest.raises(ValueError, match="window_center and window_width together"):
        ReadOptions(window_center=40.0)
    with pytest.raises(ValueError, match="window_width must be positive"):
        ReadOptions(window_center=40.0, window_width=0.0)
    with pytest.raises(ValueError, match="non-negative index or 'full'"):
        ReadOptions(window="first")
    with pytest.raises(ValueError, match="frame must be non-negative"):
        ReadOptions(frame=-1)


def test_voi_lut_sequence_is_applied_and_scaled_by_its_bit_depth(
    stored_12bit: np.ndarray, dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    # A 10-bit gamma-like LUT over modality values 0 ... 4095 (first mapped value 0).
    lut = np.round(1023 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 10])
    item.add_new("LUTData", "US", lut.tolist())
    path = dicom_writer(tmp_path / "lut.dcm", stored_12bit, bits_stored=12, VOILUTSequence=Sequence([item]))
    np.testing.assert_allclose(grey_channel(path), lut[stored_12bit] / 1023, atol=1e-6)


def test_window_options_on_colour_and_on_non_dicom_files_are_refused(
    grey_slices: list[np.ndarray], dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    from anomalib_adfa.data.image import check_options_apply

    rgb = dicom_writer(tmp_path / "rgb.dcm", np.stack([grey_slices[0]] * 3, axis=-1), "RGB")
    with pytest.raises(CorruptImageError, match=r"rgb\.dcm: RGB image: window options apply to grey-level"):
        load_image(rgb, ReadOptions(window_center=40.0, window_width=400.0))
    png = tmp_path / "plain.png"
    Image.fromarray(grey_slices[0]).save(png)
    with pytest.raises(ValueError, match=r"none of the 1 image\(s\) is DICOM"):
        check_options_apply([png], ReadOptions(window="full"))
    check_options_apply([png, rgb], ReadOptions(frame=0))  # applies to the DICOM file
    check_options_apply([png], ReadOptions())
