"""The offline synthetic head-phantom dataset: layout, determinism, masks and lesion placement."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anomalib_adfa.synthetic import body_region, implant_lesion, make_phantom_dataset

SIZE = 96


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def _head(image: np.ndarray) -> np.ndarray:
    """Head region found from the image alone: everything brighter than the noisy background, holes filled."""
    smooth = ndimage.gaussian_filter(image.astype(float), 1.0)
    return ndimage.binary_fill_holes(smooth > 0.25 * smooth.max())


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, n_train=6, n_test_normal=4, n_test_abnormal=8, image_size=SIZE, seed=3)
    return root


def test_folder_layout(dataset_root: Path) -> None:
    names = sorted(_files(dataset_root))
    assert names == sorted(
        [f"train/good/good_{i:03d}.png" for i in range(6)]
        + [f"test/good/good_{i:03d}.png" for i in range(4)]
        + [f"test/lesion/lesion_{i:03d}.png" for i in range(8)]
        + [f"ground_truth/lesion/lesion_{i:03d}.png" for i in range(8)]
    )
    for path in dataset_root.rglob("*.png"):
        assert _read(path).shape == (SIZE, SIZE)


def test_same_seed_gives_identical_files(dataset_root: Path, tmp_path: Path) -> None:
    again = make_phantom_dataset(tmp_path / "a", n_train=6, n_test_normal=4, n_test_abnormal=8, image_size=SIZE, seed=3)
    assert _files(again.root) == _files(dataset_root)
    other = make_phantom_dataset(tmp_path / "b", n_train=6, n_test_normal=4, n_test_abnormal=8, image_size=SIZE, seed=4)
    assert _files(other.root).keys() == _files(dataset_root).keys()
    assert all(a != b for a, b in zip(_files(other.root).values(), _files(dataset_root).values(), strict=True))


def test_counts_do_not_change_other_splits(dataset_root: Path, tmp_path: Path) -> None:
    fewer = make_phantom_dataset(tmp_path, n_train=2, n_test_normal=4, n_test_abnormal=3, image_size=SIZE, seed=3)
    reference = _files(dataset_root)
    for name, content in _files(fewer.root).items():
        assert content == reference[name], name


def test_images_vary(dataset_root: Path) -> None:
    images = [_read(p).astype(float) for p in sorted((dataset_root / "train/good").iterdir())]
    assert min(np.abs(a - b).mean() for i, a in enumerate(images) for b in images[i + 1 :]) > 2


def test_masks_mark_a_visible_lesion_inside_the_head(dataset_root: Path) -> None:
    for mask_path in sorted((dataset_root / "ground_truth/lesion").iterdir()):
        mask = _read(mask_path)
        assert set(np.unique(mask)) == {0, 255}, mask_path.name
        lesion = mask > 0
        assert lesion.sum() >= 20, mask_path.name
        image = _read(dataset_root / "test/lesion" / mask_path.name)
        head = _head(image)
        assert lesion[~head].sum() == 0, f"{mask_path.name} has lesion pixels outside the head"
        assert head.sum() > 5 * lesion.sum()
        # Visible: after light denoising, the lesion differs from the tissue just around it, on average (bright or
        # dark lesions) or in part (the rim or core of ring lesions).
        smooth = ndimage.gaussian_filter(image.astype(float), 1.0)
        around = ndimage.binary_dilation(lesion, iterations=3) & ~ndimage.binary_dilation(lesion, iterations=1)
        base, inside = np.median(smooth[around]), smooth[lesion]
        low, middle, high = np.percentile(inside, [10, 50, 90])
        contrast = max(abs(middle - base), high - base, base - low)
        assert contrast > 15, mask_path.name


def test_normal_images_have_no_lesion_masks(dataset_root: Path) -> None:
    normal_names = {p.name for p in (dataset_root / "test/good").iterdir()}
    mask_names = {p.name for p in (dataset_root / "ground_truth/lesion").iterdir()}
    assert mask_names == {p.name for p in (dataset_root / "test/lesion").iterdir()}
    assert not normal_names & mask_names


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    make_phantom_dataset(tmp_path, n_train=2, n_test_normal=1, n_test_abnormal=2, image_size=64)
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(FileExistsError, match=r"train/good already holds a phantom dataset"):
        make_phantom_dataset(tmp_path, n_train=1, n_test_normal=1, n_test_abnormal=1, image_size=64)
    make_phantom_dataset(tmp_path, n_train=1, n_test_normal=1, n_test_abnormal=1, image_size=64, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "train/good").iterdir()) == ["good_000.png"]
    assert sorted(p.name for p in (tmp_path / "ground_truth/lesion").iterdir()) == ["lesion_000.png"]
    assert keep.read_text() == "mine"
    foreign = tmp_path / "test/lesion/scan_17.png"
    foreign.write_bytes(b"a real image")
    with pytest.raises(FileExistsError, match=r"test/lesion holds files this generator did not write \(scan_17\.png\)"):
        make_phantom_dataset(tmp_path, n_train=1, n_test_normal=1, n_test_abnormal=1, image_size=64, overwrite=True)
    assert foreign.read_bytes() == b"a real image"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_train": -1}, "must not be negative"), ({"image_size": 32}, "at least 64"), ({"seed": -2}, "seed")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_phantom_dataset(tmp_path, **kwargs)


def _brain_image(brainmri_root: Path) -> np.ndarray:
    with Image.open(brainmri_root / "no" / "10 no.jpg") as image:
        return np.asarray(image.convert("RGB").resize((160, 160)), dtype=np.float64) / 255


def test_implanted_lesion_lies_in_the_body_and_changes_only_its_support(brainmri_root: Path) -> None:
    image = _brain_image(brainmri_root)
    body = body_region(image.mean(axis=2))
    assert 0.3 < body.mean() < 0.9  # a head on a black background
    for seed in range(5):
        implanted, mask = implant_lesion(image, np.random.default_rng(seed))
        assert implanted.shape == image.shape
        assert 0 < mask.sum() < 0.1 * mask.size
        assert body[mask].all()
        changed = np.abs(implanted - image).max(axis=2) > 0.5 / 255  # half a grey level
        assert changed[mask].mean() > 0.9
        # Beyond the soft edge (a few pixels) the image is unchanged to within half a grey level.
        assert not changed[~ndimage.binary_dilation(mask, iterations=12)].any()
        assert np.abs(implanted - image)[mask].mean() > 0.05  # visible, not a faint texture
        again, _ = implant_lesion(image, np.random.default_rng(seed))
        assert np.array_equal(again, implanted)


def test_implant_needs_room_and_an_image(brainmri_root: Path) -> None:
    thin = np.zeros((64, 64))
    thin[30:33] = 0.8  # a 3-pixel band: no room for a lesion
    with pytest.raises(ValueError, match="too thin for a lesion"):
        implant_lesion(thin, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, C\)"):
        implant_lesion(_brain_image(brainmri_root)[None], np.random.default_rng(0))
