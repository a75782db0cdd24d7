"""MedicalFolder: your own folders of DICOM / PNG images, with the checks, splits and errors of the paper datasets."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib import TaskType
from anomalib.data.utils import ValSplitMode
from PIL import Image

from anomalib_adfa.data import (
    CorruptImageError,
    DatasetLayoutError,
    MedicalFolder,
    MedicalFolderDataset,
    MedicalPredictDataset,
    ReadOptions,
    load_image,
)

pytest.importorskip("pydicom", reason="the dicom extra is not installed: pip install 'anomalib-adfa[dicom]'")

ANOMALIB = Path(sys.executable).with_name("anomalib")
FOLDERS = {"normal_dir": "train/good", "normal_test_dir": "test/good", "abnormal_dir": "test/lesion"}


def test_dicom_folders_load_like_their_png_originals(phantom_dicoms: Path, phantom_pngs) -> None:
    # same_as_test keeps every training image in train_data (the default from_train holds half out).
    datamodule = MedicalFolder(
        root=phantom_dicoms, mask_dir="ground_truth/lesion", val_split_mode="same_as_test", **FOLDERS
    )
    datamodule.setup()
    assert (len(datamodule.train_data), len(datamodule.test_data)) == (6, 6)
    assert datamodule.test_data.task == TaskType.SEGMENTATION
    assert {Path(path).suffix for path in datamodule.train_data.samples.image_path} == {".dcm", ""}
    for dataset in (datamodule.train_data, datamodule.test_data):
        for index in range(len(dataset)):
            item = dataset[index]
            path = Path(item.image_path)
            png = phantom_pngs.root / path.parent.relative_to(phantom_dicoms) / f"{path.name.removesuffix('.dcm')}.png"
            torch.testing.assert_close(item.image, load_image(png), rtol=0, atol=1e-6)
            if item.gt_label == 1:
                mask = np.asarray(Image.open(phantom_pngs.mask_dir / png.name)) > 0
                assert torch.equal(item.gt_mask.bool(), torch.from_numpy(mask))
                assert mask.any()


def test_absolute_folders_need_no_root_and_the_normal_test_split_is_seeded(phantom_dicoms: Path) -> None:
    normal, abnormal = phantom_dicoms / "train/good", phantom_dicoms / "test/lesion"
    first = MedicalFolderDataset(None, normal_dir=normal, abnormal_dir=abnormal, normal_split_ratio=0.5, seed=3)
    again = MedicalFolderDataset(None, normal_dir=normal, abnormal_dir=abnormal, normal_split_ratio=0.5, seed=3)
    other = MedicalFolderDataset(None, normal_dir=normal, abnormal_dir=abnormal, normal_split_ratio=0.5, seed=4)
    assert first.root == phantom_dicoms
    counts = first.samples.groupby(["split", "label_index"]).size().to_dict()
    assert counts == {("test", 0): 3, ("test", 1): 3, ("train", 0): 3}
    assert first.samples.equals(again.samples)
    assert set(first.samples.image_path) == set(other.samples.image_path)
    assert not first.samples.sort_values("image_path").split.equals(other.samples.sort_values("image_path").split)


def test_read_options_reach_the_items(dicom_writer: Callable[..., Path], tmp_path: Path) -> None:
    stored = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40)
    for folder, count in (("normal", 4), ("abnormal", 2)):
        for index in range(count):
            dicom_writer(
                tmp_path / folder / f"{index}.dcm", stored + index, bits_stored=12, WindowCenter=800, WindowWidth=400
            )
    windowed = MedicalFolder(root=tmp_path, normal_dir="normal", abnormal_dir="abnormal")
    full = MedicalFolder(root=tmp_path, normal_dir="normal", abnormal_dir="abnormal", window="full")
    explicit = MedicalFolder(
        root=tmp_path, normal_dir="normal", abnormal_dir="abnormal", window_center=800, window_width=400
    )
    for datamodule in (windowed, full, explicit):
        datamodule.setup()
    path = windowed.train_data.samples.image_path[0]
    torch.testing.assert_close(windowed.train_data[0].image, load_image(path))
    torch.testing.assert_close(explicit.train_data[0].image, windowed.train_data[0].image)
    torch.testing.assert_close(full.train_data[0].image, load_image(path, ReadOptions(window="full")))
    assert not torch.allclose(full.train_data[0].image, windowed.train_data[0].image)


def test_validation_modes_pass_through_to_the_base(phantom_dicoms: Path) -> None:
    datamodule = MedicalFolder(root=phantom_dicoms, val_split_mode="from_test", val_split_ratio=0.5, **FOLDERS)
    datamodule.setup()
    assert datamodule.val_split_mode == ValSplitMode.FROM_TEST
    assert len(datamodule.val_data) + len(datamodule.test_data) == 6
    assert len(datamodule.val_data) > 0
    with pytest.raises(ValueError, match="MedicalFolder has no validation folder"):
        MedicalFolder(root=phantom_dicoms, val_split_mode="from_dir", **FOLDERS)


def test_bad_files_are_all_listed_before_training(
    phantom_dicoms: Path, dicom_writer: Callable[..., Path], tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(phantom_dicoms, root)
    lesion = sorted((root / "test/lesion").iterdir())[0]
    truncated = root / "train/good/truncated.dcm"
    truncated.write_bytes(lesion.read_bytes()[:400])
    cine = dicom_writer(root / "train/good/cine.dcm", np.zeros((2, 64, 64), dtype=np.uint8))
    wrong_mask = root / "ground_truth/lesion" / f"{lesion.name.removesuffix('.dcm')}.png"
    Image.new("L", (32, 32)).save(wrong_mask)
    with pytest.raises(CorruptImageError) as error:
        MedicalFolder(root=root, mask_dir="ground_truth/lesion", **FOLDERS).setup()
    message = str(error.value)
    assert message.startswith("3 image file(s) cannot be read")
    assert f"{truncated}: " in message
    assert f"{cine}: multi-frame image (2 frames)" in message
    assert f"{wrong_mask}: mask is 32x32 pixels but its image {lesion.name} is 64x64" in message
    # The frame option makes the multi-frame file usable; the other two stay bad.
    with pytest.raises(CorruptImageError, match=r"^2 image file\(s\)"):
        MedicalFolder(root=root, mask_dir="ground_truth/lesion", frame=0, **FOLDERS).setup()


def test_empty_or_missing_folders_are_named(phantom_dicoms: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(phantom_dicoms, root)
    for path in (root / "test/lesion").iterdir():
        path.unlink()
    with pytest.raises(DatasetLayoutError, match=r"empty class folder(.|\n)*no images in '.*test/lesion'"):
        MedicalFolder(root=root, **FOLDERS).setup()
    with pytest.raises(DatasetLayoutError, match=r"lacks test/nothing/"):
        MedicalFolder(root=root, normal_dir="train/good", abnormal_dir="test/nothing").setup()
    with pytest.raises(DatasetLayoutError, match=r"no image files .* in '.*test/lesion'"):
        MedicalPredictDataset(root / "test/lesion")
    with pytest.raises(ValueError, match="not inside root"):
        MedicalFolder(root=root / "train", normal_dir="good", abnormal_dir="../test/lesion")
    with pytest.raises(ValueError, match="normal_dir and abnormal_dir are needed together"):
        MedicalFolder(root=root, normal_dir="train/good")


def test_predict_dir_alone_gives_the_predict_dataloader(phantom_dicoms: Path) -> None:
    datamodule = MedicalFolder(predict_dir=[phantom_dicoms / "test", phantom_dicoms / "train/good/good_000.dcm"])
    datamodule.setup("predict")
    batch = next(iter(datamodule.predict_dataloader()))
    assert len(datamodule.predict_data) == 7
    assert batch.image.shape == (7, 3, 64, 64)
    assert batch.gt_label is None


def test_cli_trains_tests_and_predicts_on_a_dicom_folder(
    phantom_dicoms: Path, dicom_patient_name: str, tmp_path: Path
) -> None:
    # ADFA's default visualiser draws DICOM inputs: no --model.visualizer needed.
    model = [
        "--model", "Adfa", "--model.backbone", "tf_efficientnet_lite0",
        "--model.layers", "[blocks.1, blocks.2, blocks.4]", "--model.pre_trained", "false",
        "--model.image_size", "[40, 40]", "--model.center_crop_size", "[32, 32]",
    ]  # fmt: skip
    train = [
        str(ANOMALIB), "train", *model, "--data", "anomalib_adfa.data.MedicalFolder",
        "--data.root", str(phantom_dicoms), "--data.normal_dir", "train/good", "--data.normal_test_dir", "test/good",
        "--data.abnormal_dir", "test/lesion", "--data.mask_dir", "ground_truth/lesion", "--data.window", "full",
        "--data.train_batch_size", "3", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--default_root_dir", str(tmp_path / "train"),
    ]  # fmt: skip
    result = subprocess.run(train, capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image_AUROC" in result.stdout
    (checkpoint,) = (tmp_path / "train").rglob("*.ckpt")

    predict = [
        str(ANOMALIB), "predict", *model, "--ckpt_path", str(checkpoint),
        "--data", "anomalib_adfa.data.MedicalFolder", "--data.predict_dir", str(phantom_dicoms / "test"),
        "--trainer.callbacks+=anomalib_adfa.callbacks.ScoreCSVWriter",
    ]  # fmt: skip
    result = subprocess.run(predict, capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    # Predictions land in a new folder of the checkpoint's run (anomalib_adfa.outputs).
    (predictions,) = (tmp_path / "train").rglob("predictions/0")
    assert predictions.parent.parent == checkpoint.parents[2]
    (scores,) = predictions.rglob("scores.csv")
    with scores.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    inputs = sorted(path for path in (phantom_dicoms / "test").rglob("*") if path.is_file())
    assert sorted(Path(row["image_path"]) for row in rows) == inputs
    assert all(0.0 <= float(row["pred_score"]) <= 1.0 for row in rows)
    overlays = {path.name for path in (predictions / "images").rglob("*.png")}
    assert overlays == {f"{path.name}.png" for path in inputs}
    for output in tmp_path.rglob("*"):
        if output.is_file():
            assert dicom_patient_name.encode() not in output.read_bytes(), output


def test_dicom_options_on_a_folder_without_dicom_are_refused(phantom_pngs) -> None:
    with pytest.raises(ValueError, match=r"none of the 12 image\(s\) is DICOM"):
        MedicalFolder(root=phantom_pngs.root, window_center=40, window_width=400, **FOLDERS).setup()


def test_config_and_cli_options_reach_the_reader(phantom_dicoms: Path) -> None:
    from anomalib.data import AnomalibDataModule

    config = Path(__file__).resolve().parents[2] / "configs" / "data" / "medical_folder.yaml"
    overrides = {"data.root": str(phantom_dicoms), "data.normal_dir": "train/good", "data.abnormal_dir": "test/lesion"}
    datamodule = AnomalibDataModule.from_config(config, **overrides, **{"data.window": "full"})
    assert type(datamodule) is MedicalFolder
    assert datamodule.read_options == ReadOptions(window="full")
    datamodule = AnomalibDataModule.from_config(
        config, **overrides, **{"data.window_center": "40", "data.window_width": "400", "data.frame": "0"}
    )
    assert datamodule.read_options == ReadOptions(window_center=40.0, window_width=400.0, frame=0)
