"""Bad input: wrong roots, empty folders, unreadable files; and images of every PIL mode."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_adfa.data import (
    BrainMRI,
    CorruptImageError,
    Covid,
    DatasetLayoutError,
    SIPaKMeD,
    load_image,
    load_mask,
)

PAPER_PROTOCOL = "same_as_test"  # the paper's split: every training normal trains (default from_train holds half out)


def write_images(folder: Path, count: int, image_format: str = "PNG", suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index}{suffix}"
        Image.fromarray(np.full((8, 8), index * 10, dtype=np.uint8)).save(path, format=image_format)
        paths.append(path)
    return paths


def brainmri_tree(root: Path, normal: int = 5, tumour: int = 3) -> Path:
    write_images(root / "no", normal, "JPEG", ".jpg")
    write_images(root / "yes", tumour, "JPEG", ".JPG")
    return root


def test_missing_root_says_what_to_expect_and_where_to_download(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError) as error:
        BrainMRI(val_split_mode=PAPER_PROTOCOL, root=root).setup()
    message = str(error.value)
    assert str(root) in message
    assert "does not exist" in message
    assert "├── no/" in message
    assert "└── yes/" in message
    assert "kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection" in message
    assert "nothing is downloaded" in message


def test_wrong_root_lists_what_was_found(tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "no", 3)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DatasetLayoutError) as error:
        BrainMRI(val_split_mode=PAPER_PROTOCOL, root=tmp_path).setup()
    message = str(error.value)
    assert "contains: data/, readme.txt" in message
    assert f"'{tmp_path / 'data'}' has no/ but lacks yes/" in message


def test_root_that_is_a_file_is_refused(covid_root: Path) -> None:
    with pytest.raises(DatasetLayoutError) as error:
        Covid(val_split_mode=PAPER_PROTOCOL, root=covid_root / "train" / "train.csv").setup()
    message = str(error.value)
    assert message.startswith(f"Covid: no usable dataset at '{covid_root / 'train' / 'train.csv'}'")
    assert "is a file, not a folder" in message
    assert "│   ├── NORMAL/" in message
    assert "kaggle.com/datasets/khoongweihao/covid19-xray-dataset-train-test-sets" in message


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    brainmri_tree(tmp_path)
    for path in (tmp_path / "yes").iterdir():
        path.unlink()
    (tmp_path / "yes" / "Thumbs.db").write_bytes(b"\0")
    with pytest.raises(DatasetLayoutError, match=r"empty class folder(.|\n)*no images in '.*yes'"):
        BrainMRI(val_split_mode=PAPER_PROTOCOL, root=tmp_path).setup()


def test_too_few_images_for_the_split_is_an_error(tmp_path: Path) -> None:
    brainmri_tree(tmp_path, normal=1)  # round(58/98) = 1 train image leaves no normal test image
    with pytest.raises(DatasetLayoutError, match=r"too few images .* normal test images"):
        BrainMRI(val_split_mode=PAPER_PROTOCOL, root=tmp_path).setup()


def test_every_corrupt_or_truncated_file_is_reported_at_setup(tmp_path: Path) -> None:
    brainmri_tree(tmp_path, normal=6)
    garbage = tmp_path / "no" / "1.jpg"
    garbage.write_bytes(b"this is not an image")
    truncated_jpeg = tmp_path / "yes" / "2.JPG"
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    truncated_jpeg.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    truncated_png = tmp_path / "no" / "5.png"
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    truncated_png.write_bytes(png.getvalue()[:-40])

    datamodule = BrainMRI(val_split_mode=PAPER_PROTOCOL, root=tmp_path)
    with pytest.raises(CorruptImageError) as error:
        datamodule.setup()
    message = str(error.value)
    assert message.startswith("3 image file(s) cannot be read")
    for path in (garbage, truncated_jpeg, truncated_png):
        assert str(path) in message
    unchecked = BrainMRI(val_split_mode=PAPER_PROTOCOL, root=tmp_path, check_images=False)
    unchecked.setup()
    assert len(unchecked.train_data) + len(unchecked.test_data) == 10  # 7 normal (with 5.png) + 3 tumour


def test_truncated_bmp_is_reported(tmp_path: Path, sipakmed_factory: Callable[..., Path]) -> None:
    counts = {"im_Parabasal": 4, "im_Superficial-Intermediate": 5, "im_Dyskeratotic": 3, "im_Koilocytotic": 2}
    root = sipakmed_factory(tmp_path, counts=counts)
    bmp = root / "im_Dyskeratotic" / "002.bmp"
    bmp.write_bytes(bmp.read_bytes()[:-20])
    with pytest.raises(CorruptImageError, match=r"1 image file\(s\)(.|\n)*im_Dyskeratotic/002.bmp"):
        SIPaKMeD(val_split_mode=PAPER_PROTOCOL, root=root).setup()


def test_from_dir_validation_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no validation folder"):
        BrainMRI(root=tmp_path, val_split_mode="from_dir")


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "F"])
def test_every_pil_mode_loads_as_three_channels(tmp_path: Path, mode: str) -> None:
    rgb = Image.fromarray(np.arange(48 * 3, dtype=np.uint8).reshape(6, 8, 3))
    image = rgb.convert(mode) if mode not in {"I", "F"} else rgb.convert("L").convert(mode)
    path = tmp_path / ("image.tiff" if mode in {"CMYK", "I", "F", "PA"} else "image.png")
    image.save(path)
    assert Image.open(path).mode == mode
    loaded = load_image(path)
    assert loaded.shape == (3, 6, 8)
    assert loaded.dtype == torch.float32
    assert 0.0 <= float(loaded.min()) <= float(loaded.max()) <= 1.0
    assert float(loaded.max()) > 0.0


def test_palette_with_transparency_loads_its_colours(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 30000]], dtype=np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    loaded = load_image(path)
    assert loaded.shape == (3, 1, 4)
    expected = torch.tensor([0.0, 100 / 255, 1.0, 30000 / 65535])
    assert torch.allclose(loaded[0, 0], expected, atol=1e-6)
    assert torch.equal(loaded[0], loaded[2])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (16, 8), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 4, 4))  # blue top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored image must be turned 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100, subsampling=0)
    loaded = load_image(path)
    assert loaded.shape == (3, 16, 8)
    assert loaded[2, 1, -2] > 0.8  # the blue corner is now top-right
    assert loaded[0, 1, -2] < 0.2
    assert loaded[0, 1, 1] > 0.8


def test_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    Image.new("L", (5, 5), 255).save(path)
    assert int(load_mask([path], (5, 5)).sum()) == 25
    with pytest.raises(ValueError, match="5x5 pixels but its image is 8x6"):
        load_mask([path], (6, 8))
