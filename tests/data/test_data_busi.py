"""BUSI: the paper's split on a generated full-size tree, and mask unions on the real sample."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_adfa.data import BUSI, BUSIDataset, DatasetLayoutError

PAPER_PROTOCOL = "same_as_test"  # the paper's split: every training normal trains (default from_train holds half out)


def setup(datamodule: BUSI) -> BUSI:
    datamodule.setup()
    return datamodule


def split_counts(datamodule: BUSI) -> tuple[int, dict[int, int]]:
    return len(datamodule.train_data), datamodule.test_data.samples.label_index.value_counts().to_dict()


def union_of(*paths: Path) -> np.ndarray:
    return np.logical_or.reduce([np.asarray(Image.open(path).convert("L")) > 0 for path in paths])


def test_full_layout_gives_the_paper_split(busi_full_root: Path) -> None:
    datamodule = setup(BUSI(val_split_mode=PAPER_PROTOCOL, root=busi_full_root))
    assert split_counts(datamodule) == (96, {1: 496, 0: 32})
    test = datamodule.test_data.samples
    assert set(test.label[test.label_index == 1]) == {"benign", "malignant"}
    assert set(datamodule.train_data.samples.label) == {"normal"}
    assert datamodule.task.value == "segmentation"


def test_option_all_uses_every_abnormal_image(busi_full_root: Path) -> None:
    assert split_counts(setup(BUSI(val_split_mode=PAPER_PROTOCOL, root=busi_full_root, abnormal="all"))) == (
        96,
        {1: 647, 0: 32},
    )


def test_masks_are_never_samples_and_clutter_is_ignored(busi_full_root: Path) -> None:
    samples = setup(BUSI(val_split_mode=PAPER_PROTOCOL, root=busi_full_root, abnormal="all")).test_data.samples
    names = [Path(path).name for path in samples.image_path]
    assert not [name for name in names if "_mask" in name]
    assert all(Path(path).suffix.lower() == ".png" for path in samples.image_path)
    assert any(name.endswith(".PNG") for name in names)  # odd-case extensions are images too
    assert not [path for path in samples.image_path if "__MACOSX" in path]


def test_split_is_seeded_and_disjoint(busi_full_root: Path) -> None:
    first, again, other = (
        setup(BUSI(val_split_mode=PAPER_PROTOCOL, root=busi_full_root, seed=seed)) for seed in (1024, 1024, 317)
    )
    train = set(first.train_data.samples.image_path)
    test = set(first.test_data.samples.image_path)
    assert not train & test
    assert train == set(again.train_data.samples.image_path)
    assert test == set(again.test_data.samples.image_path)
    assert train != set(other.train_data.samples.image_path)
    assert split_counts(other) == (96, {1: 496, 0: 32})


def test_extra_masks_are_joined(busi_full_root: Path, generated_lesion_masks: tuple[np.ndarray, np.ndarray]) -> None:
    dataset = BUSIDataset(root=busi_full_root, split="test", abnormal="all")
    samples = dataset.samples
    index = samples.index[samples.image_path.str.endswith("benign (163).png")][0]
    assert [Path(path).name for path in samples.mask_paths[index]] == [
        "benign (163)_mask.png",
        "benign (163)_mask_1.png",
        "benign (163)_mask_2.png",
    ]
    lesion, second = generated_lesion_masks
    assert np.array_equal(dataset[index].gt_mask.numpy(), lesion | second)


def test_real_sample_masks_are_unions(busi_sample_root: Path) -> None:
    dataset = BUSIDataset(root=busi_sample_root, split="test", abnormal="all")
    samples = dataset.samples
    for stem in ("benign (100)", "benign (163)", "malignant (53)"):
        index = samples.index[samples.image_path.str.endswith(f"{stem}.png")][0]
        folder = Path(samples.image_path[index]).parent
        first, second = folder / f"{stem}_mask.png", folder / f"{stem}_mask_1.png"
        assert Image.open(first).mode == "1"
        mask = dataset[index].gt_mask.numpy()
        assert set(np.unique(mask)) == {0, 1}
        assert np.array_equal(mask.astype(bool), union_of(first, second))
        assert mask.sum() > max(union_of(first).sum(), union_of(second).sum())


def test_real_sample_normal_masks_are_empty(busi_sample_root: Path) -> None:
    dataset = BUSIDataset(root=busi_sample_root, split="test")
    normal = dataset.samples.index[dataset.samples.label_index == 0]
    assert len(normal) == 2
    first_mask_file = Path(dataset.samples.image_path[normal[0]].replace(".png", "_mask.png"))
    assert Image.open(first_mask_file).mode == "RGB"  # real normal masks are 8-bit RGB
    for index in normal:
        item = dataset[index]
        assert item.gt_mask.shape == item.image.shape[-2:]
        assert int(item.gt_mask.sum()) == 0


def test_real_sample_split_follows_the_documented_rule(busi_sample_root: Path) -> None:
    # 8 normal: round(8 * 96/133) = 6 train, round(8 * 128/133) - 6 = 2 test; 13 abnormal: round(13 * 496/647) = 10.
    assert split_counts(setup(BUSI(val_split_mode=PAPER_PROTOCOL, root=busi_sample_root))) == (6, {1: 10, 0: 2})
    assert split_counts(setup(BUSI(val_split_mode=PAPER_PROTOCOL, root=busi_sample_root.parent, abnormal="all"))) == (
        6,
        {1: 13, 0: 2},
    )


def test_copies_without_masks_are_classification(tmp_path: Path, busi_factory: Callable[..., Path]) -> None:
    root = busi_factory(tmp_path, counts={"normal": 8, "benign": 5, "malignant": 4}, masks=False)
    datamodule = setup(BUSI(val_split_mode=PAPER_PROTOCOL, root=root))
    assert datamodule.task.value == "classification"
    assert split_counts(datamodule) == (6, {1: 7, 0: 2})
    assert datamodule.test_data[0].gt_mask is None


def test_partially_masked_copies_are_refused(tmp_path: Path, busi_factory: Callable[..., Path]) -> None:
    root = busi_factory(tmp_path, counts={"normal": 8, "benign": 5, "malignant": 4})
    (root / "malignant" / "malignant (2)_mask.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"some abnormal images have masks(.|\n)*malignant \(2\)\.png"):
        BUSI(val_split_mode=PAPER_PROTOCOL, root=root, abnormal="all").setup()


def test_unknown_abnormal_option_is_refused(busi_sample_root: Path) -> None:
    with pytest.raises(ValueError, match="abnormal must be 'paper' or 'all'"):
        BUSIDataset(root=busi_sample_root, abnormal="benign")
