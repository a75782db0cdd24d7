"""Shared pytest fixtures: paths to the real medical images, and small tested runs with masks."""

import json
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine

from anomalib_adfa import Adfa
from anomalib_adfa.backbones import efficientnet_lite0_weights
from anomalib_adfa.callbacks import EvaluationRecorder
from anomalib_adfa.data import BUSI
from anomalib_adfa.synthetic import make_phantom_dataset

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_dataset(relative: str) -> Path:
    """Return ``../shared/data/<relative>`` or skip the calling test when it is absent."""
    path = SHARED_DATA / relative
    if not path.is_dir():
        pytest.skip(f"real images not available: {path} is missing (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def brainmri_root() -> Path:
    """Root of the real BrainMRI download (``no/``, ``yes/``)."""
    return shared_dataset("brain_tumor_dataset")


@pytest.fixture(scope="session")
def covid_root() -> Path:
    """Root of the real Covid download (``train/``, ``test/``)."""
    return shared_dataset("covid19_xray/xray_dataset_covid19")


@pytest.fixture(scope="session")
def busi_sample_root() -> Path:
    """Root of the small real BUSI sample (``normal/``, ``benign/``, ``malignant/``)."""
    return shared_dataset("busi_sample/Dataset_BUSI_with_GT")


@pytest.fixture(scope="session")
def localisation_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ADFA (Lite0, 1 epoch, 64 px) tested with masks and a EvaluationRecorder, on the phantom set and the BUSI sample.

    Returns:
        Run folder of each data source that exists (``"phantom"`` always; ``"busi_sample"`` when present), each
        holding ``report_data/``, ``metrics.json`` (the metrics ``Engine.test`` returned) and ``raw_maps.pt``
        (the recorder's raw maps and masks, as compared).
    """
    root = tmp_path_factory.mktemp("localisation")
    phantom = make_phantom_dataset(root / "phantom_data", n_train=6, n_test_normal=3, n_test_abnormal=4, image_size=64)
    datamodules = {
        "phantom": Folder(
            name="phantom",
            root=phantom.root,
            normal_dir="train/good",
            abnormal_dir="test/lesion",
            normal_test_dir="test/good",
            mask_dir="ground_truth/lesion",
            train_batch_size=8,
            eval_batch_size=8,
            num_workers=0,
            val_split_mode="same_as_test",
        )
    }
    busi = SHARED_DATA / "busi_sample" / "Dataset_BUSI_with_GT"
    if busi.is_dir():
        datamodules["busi_sample"] = BUSI(root=busi, train_batch_size=8, eval_batch_size=4)
    runs = {}
    for name, datamodule in datamodules.items():
        model = Adfa(
            backbone="tf_efficientnet_lite0",
            layers=("blocks.1", "blocks.2", "blocks.4"),
            backbone_weights=efficientnet_lite0_weights(),
            topk_mode="hard",
            image_size=(72, 72),
            center_crop_size=(64, 64),
            visualizer=False,
        )
        run = root / name
        recorder = EvaluationRecorder(output_dir=run)
        engine = Engine(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            default_root_dir=run,
            callbacks=[recorder],
        )
        engine.fit(model, datamodule=datamodule)
        metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
        (run / "metrics.json").write_text(json.dumps({key: float(value) for key, value in metrics.items()}))
        torch.save({"maps": torch.cat(recorder.maps), "masks": torch.cat(recorder.masks)}, run / "raw_maps.pt")
        runs[name] = run
    return runs
