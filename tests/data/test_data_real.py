"""BrainMRI and Covid on the real downloads in ../shared/data: the paper's Table 2 splits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2 import Resize

from anomalib_adfa.data import BrainMRI, Covid
from anomalib_adfa.data.base import MedicalDataModule

PAPER_PROTOCOL = "same_as_test"  # the paper's split: every training normal trains (default from_train holds half out)


def file_names(dataset: object) -> set[str]:
    """``<class folder>/<file name>`` of every sample of a dataset."""
    return {f"{Path(path).parent.name}/{Path(path).name}" for path in dataset.samples.image_path}


def label_counts(datamodule: MedicalDataModule) -> dict[int, int]:
    return datamodule.test_data.samples.label_index.value_counts().to_dict()


def setup(datamodule: MedicalDataModule) -> MedicalDataModule:
    datamodule.setup()
    return datamodule


def link_tree(source: Path, target: Path, rename: Callable[[str], str] = str) -> None:
    """Mirror ``source`` into ``target`` with symbolic links to its files, renaming every entry with ``rename``."""
    for path in sorted(source.rglob("*")):
        relative = Path(*(rename(part) for part in path.relative_to(source).parts))
        if path.is_dir():
            (target / relative).mkdir(parents=True, exist_ok=True)
        else:
            (target / relative).symlink_to(path.resolve())


def test_brainmri_has_the_paper_split(brainmri_root: Path) -> None:
    datamodule = setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root))
    assert len(datamodule.train_data) == 58
    assert label_counts(datamodule) == {0: 40, 1: 155}
    assert set(datamodule.train_data.samples.label) == {"no"}
    test = datamodule.test_data.samples
    assert set(test.label[test.label_index == 1]) == {"yes"}
    assert datamodule.task.value == "classification"


def test_brainmri_uses_every_image_once(brainmri_root: Path) -> None:
    datamodule = setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root))
    train, test = file_names(datamodule.train_data), file_names(datamodule.test_data)
    assert not train & test
    on_disk = {f"{p.parent.name}/{p.name}" for p in brainmri_root.glob("*/*") if p.is_file()}
    assert train | test == on_disk
    assert len(on_disk) == 253


def test_brainmri_split_is_reproducible_and_seeded(brainmri_root: Path) -> None:
    first = file_names(setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root)).train_data)
    again = file_names(setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root)).train_data)
    other = setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root, seed=213))
    assert first == again
    assert len(other.train_data) == 58
    assert label_counts(other) == {0: 40, 1: 155}
    assert file_names(other.train_data) != first


def test_brainmri_split_ignores_listing_order(brainmri_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = file_names(setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root)).train_data)
    original = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(original(self), reverse=True)))
    assert file_names(setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root)).train_data) == expected


def test_brainmri_split_ignores_case_clutter_and_kaggle_duplicates(brainmri_root: Path, tmp_path: Path) -> None:
    """A copy with upper-cased names, stray files and Kaggle's duplicate top-level no/ yes/ gives the same split."""
    expected = {
        name.casefold()
        for name in file_names(setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root)).train_data)
    }
    archive = tmp_path / "archive"
    link_tree(brainmri_root, archive, rename=str.upper)  # NO/, YES/, '1 NO.JPEG' ...
    link_tree(brainmri_root, archive / "brain_tumor_dataset")  # the duplicate copy
    for folder in (archive / "NO", archive / "YES"):
        (folder / ".DS_Store").write_bytes(b"\0")
        (folder / "Thumbs.db").write_bytes(b"\0")
    (archive / "__MACOSX" / "NO").mkdir(parents=True)
    (archive / "__MACOSX" / "NO" / "._1 no.jpeg").write_bytes(b"\0")

    datamodule = setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=archive))
    assert len(datamodule.train_data) == 58
    assert label_counts(datamodule) == {0: 40, 1: 155}
    assert {name.casefold() for name in file_names(datamodule.train_data)} == expected


def test_brainmri_accepts_the_parent_folder(brainmri_root: Path, tmp_path: Path) -> None:
    link_tree(brainmri_root, tmp_path / "download" / "brain_tumor_dataset")
    datamodule = setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=tmp_path / "download"))
    assert len(datamodule.train_data) == 58
    assert label_counts(datamodule) == {0: 40, 1: 155}


def test_validation_is_the_test_split(brainmri_root: Path) -> None:
    datamodule = setup(BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root))
    assert datamodule.val_data.samples.image_path.tolist() == datamodule.test_data.samples.image_path.tolist()
    assert datamodule.num_workers == 0


def test_items_and_batches_are_three_channel(brainmri_root: Path) -> None:
    datamodule = setup(
        BrainMRI(val_split_mode=PAPER_PROTOCOL, root=brainmri_root, eval_batch_size=4, augmentations=Resize((32, 32)))
    )
    item = datamodule.test_data[0]
    assert item.image.dtype == torch.float32
    assert item.image.shape == (3, 32, 32)
    assert 0.0 <= float(item.image.min()) <= float(item.image.max()) <= 1.0
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape == (4, 3, 32, 32)
    assert batch.gt_label.tolist() == datamodule.test_data.samples.label_index.tolist()[:4]


def test_covid_has_the_official_split(covid_root: Path) -> None:
    datamodule = setup(Covid(val_split_mode=PAPER_PROTOCOL, root=covid_root))
    assert len(datamodule.train_data) == 74
    assert label_counts(datamodule) == {0: 20, 1: 20}
    train_dirs = {Path(p).parent.relative_to(covid_root).as_posix() for p in datamodule.train_data.samples.image_path}
    assert train_dirs == {"train/NORMAL"}
    test = datamodule.test_data.samples
    assert {Path(p).parent.relative_to(covid_root).as_posix() for p in test.image_path} == {
        "test/NORMAL",
        "test/PNEUMONIA",
    }
    assert set(test.label[test.label_index == 1]) == {"PNEUMONIA"}
    assert not set(datamodule.train_data.samples.image_path) & set(test.image_path)


def test_covid_accepts_the_parent_folder_and_ignores_the_seed(covid_root: Path) -> None:
    reference = setup(Covid(val_split_mode=PAPER_PROTOCOL, root=covid_root))
    from_parent = setup(Covid(val_split_mode=PAPER_PROTOCOL, root=covid_root.parent, seed=317))
    assert from_parent.train_data.samples.image_path.tolist() == reference.train_data.samples.image_path.tolist()
    assert from_parent.test_data.samples.image_path.tolist() == reference.test_data.samples.image_path.tolist()
