"""Label-free validation protocols of the medical datamodules: from_train, synthetic, and the paper's same_as_test."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from anomalib.data.utils import LabelName, ValSplitMode
from PIL import Image

from anomalib_adfa.data import BrainMRI, BrainMRIDataset
from anomalib_adfa.data.protocols import PROTOCOL_FILE


@pytest.fixture(scope="module")
def brainmri_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BrainMRI download with 20 normal and 6 tumour 16x16 images (12 normals train, 8 test)."""
    root = tmp_path_factory.mktemp("brainmri") / "brain_tumor_dataset"
    rng = np.random.default_rng(0)
    for folder, count in (("no", 20), ("yes", 6)):
        (root / folder).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(60, 200, size=(16, 16), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / folder / f"{index} {folder}.png")
    return root


def _setup(root: Path, **options: object) -> BrainMRI:
    datamodule = BrainMRI(root=root, check_images=False, **options)
    datamodule.setup()
    return datamodule


def _paths(dataset: object) -> set[str]:
    return set(dataset.samples.image_path)


def test_default_is_from_train_and_holds_out_seeded_normals(
    brainmri_layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    datamodule = _setup(brainmri_layout)
    assert datamodule.val_split_mode == ValSplitMode.FROM_TRAIN
    train, val, test = _paths(datamodule.train_data), _paths(datamodule.val_data), _paths(datamodule.test_data)
    assert len(train) == len(val) == 6  # half of the 12 training normals
    assert not train & val
    assert not (train | val) & test  # the test split is untouched
    assert len(test) == 8 + 6
    assert (datamodule.val_data.samples.label_index == LabelName.NORMAL).all()
    printed = capsys.readouterr().out
    assert "val_split_mode from_train" in printed
    assert "train_normal 6, val_normal 6, val_abnormal 0, test_normal 8, test_abnormal 6" in printed
    assert _paths(_setup(brainmri_layout).val_data) == val  # same seed, same hold-out
    assert _paths(_setup(brainmri_layout, seed=213).val_data) != val


def test_synthetic_turns_half_of_the_held_out_normals_into_anomalies(brainmri_layout: Path) -> None:
    datamodule = _setup(brainmri_layout, val_split_mode="synthetic")
    samples = datamodule.val_data.samples
    assert len(datamodule.train_data) == 6
    assert (samples.label_index == LabelName.ABNORMAL).sum() == 3
    assert (samples.label_index == LabelName.NORMAL).sum() == 3
    assert datamodule.protocol["val_abnormal"] == 3
    assert isinstance(datamodule.val_data, BrainMRIDataset)  # read with the dataset's own loader
    item = datamodule.val_data[int(np.flatnonzero(samples.label_index == LabelName.ABNORMAL)[0])]
    assert item.gt_mask is not None  # anomalib's Perlin generator writes a mask per synthetic anomaly
    again = _setup(brainmri_layout, val_split_mode="synthetic").val_data
    normal = samples.label_index == LabelName.NORMAL
    assert set(samples.image_path[normal]) == set(again.samples.image_path[again.samples.label_index == 0])
    first = np.asarray(Image.open(samples.image_path[~normal].iloc[0]))
    second = np.asarray(Image.open(again.samples.image_path[again.samples.label_index == 1].iloc[0]))
    assert np.array_equal(first, second)  # the synthetic anomalies are seeded too


def test_same_as_test_is_the_paper_protocol(brainmri_layout: Path) -> None:
    datamodule = _setup(brainmri_layout, val_split_mode="same_as_test")
    assert len(datamodule.train_data) == 12
    assert _paths(datamodule.val_data) == _paths(datamodule.test_data)
    assert "test-calibrated" in datamodule.protocol["note"]


def test_protocol_is_recorded_in_the_run_folder_and_the_checkpoint(brainmri_layout: Path, tmp_path: Path) -> None:
    datamodule = BrainMRI(root=brainmri_layout, check_images=False, val_split_mode="synthetic")
    datamodule.trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True)
    datamodule.setup()
    saved = json.loads((tmp_path / PROTOCOL_FILE).read_text())
    assert saved["val_split_mode"] == "synthetic"
    assert saved["val_normal"] == 3
    assert datamodule.state_dict() == {"protocol": saved}
    restored = BrainMRI(root=brainmri_layout, check_images=False)
    restored.load_state_dict(datamodule.state_dict())
    assert restored.trained_protocol["val_split_mode"] == "synthetic"


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5])
def test_a_hold_out_ratio_outside_zero_one_is_refused(brainmri_layout: Path, ratio: float) -> None:
    with pytest.raises(ValueError, match=r"val_split_ratio must be in \(0, 1\)"):
        BrainMRI(root=brainmri_layout, val_split_mode="from_train", val_split_ratio=ratio)


def test_a_hold_out_that_leaves_no_image_is_refused(brainmri_layout: Path) -> None:
    with pytest.raises(ValueError, match="both need at least one image"):
        _setup(brainmri_layout, val_split_ratio=0.01)


@pytest.mark.parametrize("name", ["BrainMRI", "Covid", "BUSI", "SIPaKMeD", "MedicalFolder"])
def test_every_datamodule_defaults_to_the_label_free_protocol(name: str) -> None:
    import inspect

    from anomalib_adfa import data
    from anomalib_adfa.data.base import MedicalDataModule

    base_default = inspect.signature(MedicalDataModule.__init__).parameters["val_split_mode"].default
    parameter = inspect.signature(getattr(data, name).__init__).parameters.get("val_split_mode")
    assert base_default == ValSplitMode.FROM_TRAIN
    # Datamodules that spell the argument out must not keep an older default; the others inherit the base's.
    assert parameter is None or parameter.kind is parameter.VAR_KEYWORD or parameter.default == base_default
