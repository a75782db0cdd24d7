"""Cross-fitting end to end on the phantom set, for ADFA and anomalib's PaDiM and PatchCore; and its refusals.

Each model trains through the Engine with ``MedicalFolder(val_split_mode="crossfit")`` and
:class:`CrossFitThreshold` (3 folds of 12 training normals, 1 epoch, 48 px input, Lite0): every training normal is
scored once by the fold model that did not train on it, the deployed model trains on all 12, the threshold is the
conformal-rank out-of-fold score (in the checkpoint too), and ``anomalib test`` leads with that operating point.
"""

from __future__ import annotations

import csv
import math
import platform
from pathlib import Path

import pytest
import torch
from anomalib.cli import AnomalibCLI
from anomalib.engine import Engine
from anomalib.models import Padim, Patchcore
from anomalib.post_processing import PostProcessor

from anomalib_adfa import Adfa, SpecificityPostProcessor
from anomalib_adfa.callbacks import SELECTION_QUANTITIES, CrossFitThreshold, LabelFreeCheckpoint
from anomalib_adfa.data import MedicalFolder
from anomalib_adfa.data.split import seeded_folds
from anomalib_adfa.evaluation import crossfit as crossfit_module
from anomalib_adfa.evaluation.crossfit import _VALIDATION_QUANTITIES, CROSSFIT_SCORES_FILE, pin_mmap_threshold
from anomalib_adfa.evaluation.post_processing import RankPreservingPostProcessor
from anomalib_adfa.synthetic import make_phantom_dataset
from anomalib_adfa.weights import LITE0_BACKBONE, efficientnet_lite0_weights
from benchmarks.models import ModelSettings, build_model

SIZE = 64  # the phantom generator's smallest; the models resize to MODEL_SIZE
MODEL_SIZE = 48
FOLDS = 3
TARGET = 0.9
FOLDERS = {
    "normal_dir": "train/good",
    "normal_test_dir": "test/good",
    "abnormal_dir": "test/lesion",
    "mask_dir": "ground_truth/lesion",
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 normal training images, 4 normal and 4 lesion test images."""
    return make_phantom_dataset(tmp_path_factory.mktemp("crossfit_data"), 12, 4, 4, image_size=SIZE, seed=3).root


def _datamodule(root: Path, mode: str = "crossfit") -> MedicalFolder:
    return MedicalFolder(
        root=root, train_batch_size=4, eval_batch_size=8, val_split_mode=mode, seed=7, check_images=False, **FOLDERS
    )


def _adfa() -> Adfa:
    return Adfa(
        backbone=LITE0_BACKBONE,
        layers=("blocks.1", "blocks.2", "blocks.4"),
        backbone_weights=efficientnet_lite0_weights(),
        topk_mode="hard",
        image_size=(MODEL_SIZE, MODEL_SIZE),
        center_crop_size=None,
        visualizer=False,
        post_processor=SpecificityPostProcessor(target_specificity=TARGET),
    )


def _anomalib_model(name: str) -> Padim | Patchcore:
    def pre_processor() -> object:
        return Adfa.configure_pre_processor(
            image_size=(MODEL_SIZE, MODEL_SIZE), center_crop_size=None, normalization=LITE0_BACKBONE
        )

    model = build_model(name, ModelSettings(LITE0_BACKBONE, efficientnet_lite0_weights(), pre_processor))
    model.post_processor.target_specificity = TARGET
    return model


def _padim() -> Padim:
    return _anomalib_model("padim")


def _engine(root: Path, callbacks: list) -> Engine:
    return Engine(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )


@pytest.fixture(scope="module", params=["adfa", "padim", "patchcore"])
def crossfitted(request: pytest.FixtureRequest, phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train and test one model under crossfit, recording which images each fold model trained on and scored."""
    torch.manual_seed(0)
    model = _adfa() if request.param == "adfa" else _anomalib_model(request.param)
    datamodule = _datamodule(phantoms)
    callback = CrossFitThreshold(folds=FOLDS)
    seen: list[tuple[set[str], set[str]]] = []
    original = CrossFitThreshold._fit_and_score

    def spy(self, fold_model, trainer, dataset, train_rows, held_out_rows):
        paths = dataset.samples.image_path
        seen.append(({paths.iloc[row] for row in train_rows}, {paths.iloc[row] for row in held_out_rows}))
        return original(self, fold_model, trainer, dataset, train_rows, held_out_rows)

    pinned: list[bool] = []

    def pin_spy() -> bool:
        pinned.append(pin_mmap_threshold())
        return pinned[-1]

    patch = pytest.MonkeyPatch()
    patch.setattr(CrossFitThreshold, "_fit_and_score", spy)
    patch.setattr(crossfit_module, "pin_mmap_threshold", pin_spy)
    root = tmp_path_factory.mktemp(f"crossfit_{request.param}")
    engine = _engine(root, [callback])
    try:
        engine.fit(model, datamodule=datamodule)
    finally:
        patch.undo()
    (metrics,) = engine.test(model, datamodule=datamodule, verbose=False)
    return {
        "model": model,
        "callback": callback,
        "datamodule": datamodule,
        "seen": seen,
        "pinned": pinned,
        "metrics": metrics,
        "root": root,
        "checkpoint": engine.trainer.checkpoint_callback.best_model_path,
    }


def test_every_training_normal_is_scored_once_out_of_fold(crossfitted: dict) -> None:
    callback, datamodule = crossfitted["callback"], crossfitted["datamodule"]
    train_paths = set(datamodule.train_data.samples.image_path)
    assert len(train_paths) == 12  # the deployed model trains on every training normal
    assert sorted(callback.paths) == sorted(train_paths)  # each scored exactly once
    seen = crossfitted["seen"]
    assert len(seen) == FOLDS
    for trained, scored in seen:
        assert trained.isdisjoint(scored)  # a fold model never scores an image it trained on
        assert trained | scored == train_paths
    expected = seeded_folds(sorted(train_paths), FOLDS, seed=7)  # the datamodule's seed
    assert [sorted(scored) for _, scored in seen] == [sorted(fold) for fold in expected]
    assert [sum(fold == k for fold in callback.fold_of) for k in range(FOLDS)] == [4, 4, 4]


def test_anomalib_memory_bank_models_fix_the_mmap_threshold(crossfitted: dict) -> None:
    # PatchCore's coreset loop fragments glibc's heap after training (18.4 GB instead of 1.3 GB on BrainMRI)
    assert len(crossfitted["pinned"]) == (0 if isinstance(crossfitted["model"], Adfa) else 1)  # PaDiM, PatchCore


def test_the_mmap_threshold_is_left_alone_when_the_environment_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert pin_mmap_threshold() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_MMAP_THRESHOLD) is glibc's")
def test_the_mmap_threshold_is_fixed_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert pin_mmap_threshold() is True


def test_threshold_is_the_conformal_rank_of_the_out_of_fold_scores(crossfitted: dict) -> None:
    model, callback = crossfitted["model"], crossfitted["callback"]
    scores = callback.scores
    rank = math.ceil((12 + 1) * TARGET)  # 11.7 -> 12: the largest of 12
    quantile = torch.sort(scores).values[rank - 1]
    expected = RankPreservingPostProcessor.threshold_in_gap(quantile.float(), scores.float(), "above")
    threshold = model.post_processor.image_threshold
    assert float(threshold) == pytest.approx(float(expected), rel=1e-6)
    stats = model.post_processor.image_threshold_stats
    assert stats["normal_count"] == 12
    assert stats["calibration"].startswith(f"crossfit ({FOLDS} folds")
    checkpoint = torch.load(crossfitted["checkpoint"], map_location="cpu", weights_only=False)
    assert float(checkpoint["state_dict"]["post_processor._image_threshold"]) == pytest.approx(float(threshold))
    (saved,) = crossfitted["root"].rglob(CROSSFIT_SCORES_FILE)  # in the run folder anomalib's engine chose
    with saved.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["image_path"] for row in rows) == sorted(callback.paths)
    protocol = crossfitted["datamodule"].protocol
    assert (protocol["val_split_mode"], protocol["train_normal"], protocol["val_normal"]) == ("crossfit", 12, 0)


def test_test_output_leads_with_the_operating_point(crossfitted: dict) -> None:
    model, metrics = crossfitted["model"], crossfitted["metrics"]
    summary = model.evaluator.summary
    assert summary is not None
    assert (summary.abnormal, summary.normal) == (4, 4)
    assert summary.calibration_normals == 12
    assert summary.target_specificity == TARGET
    assert summary.threshold_normalized == 0.5
    assert summary.threshold_raw == pytest.approx(float(model.post_processor.image_threshold))
    assert metrics["image_Specificity"] == pytest.approx(summary.specificity)
    assert metrics["image_Sensitivity"] == pytest.approx(summary.sensitivity)
    assert metrics["image_Specificity_CI_low"] <= summary.specificity <= metrics["image_Specificity_CI_high"]
    assert metrics["image_threshold_normals"] == 12
    lines = summary.lines()
    assert lines[0].startswith("Operating point: pred_label = 1 when the score > 0.5 [raw ")
    assert "target specificity 0.9 on n = 12 normal images (crossfit (3 folds" in lines[1]


def test_crossfit_without_the_callback_is_refused(phantoms: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"no validation set.*trainer.callbacks\+=anomalib_adfa.callbacks"):
        _engine(tmp_path, []).fit(_padim(), datamodule=_datamodule(phantoms))


def test_a_held_out_validation_split_is_refused(phantoms: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"val_split_mode=from_train holds 6 images out.*val_split_mode crossfit"):
        _engine(tmp_path, [CrossFitThreshold()]).fit(_padim(), datamodule=_datamodule(phantoms, "from_train"))


@pytest.mark.parametrize("folds", [1, 0, 2.5, True])
def test_a_fold_count_below_two_is_refused_naming_the_option(folds: object) -> None:
    with pytest.raises(
        ValueError, match=r"folds must be an integer of at least 2.*--trainer.callbacks.folds 5"
    ) as error:
        CrossFitThreshold(folds=folds)  # type: ignore[arg-type]
    assert "\n" not in str(error.value)


def test_more_folds_than_normals_is_refused_before_training(phantoms: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"folds=13 exceeds the 12 normal training images.*folds 12 or fewer"):
        _engine(tmp_path, [CrossFitThreshold(folds=13)]).fit(_padim(), datamodule=_datamodule(phantoms))


def test_too_few_normals_are_refused(tmp_path: Path) -> None:
    root = make_phantom_dataset(tmp_path / "data", 1, 2, 2, image_size=SIZE, seed=0).root
    with pytest.raises(ValueError, match="needs at least 2 normal training images to cross-fit, found 1"):
        _engine(tmp_path, [CrossFitThreshold(folds=2)]).fit(_padim(), datamodule=_datamodule(root))


def test_a_post_processor_without_a_normal_threshold_is_refused(phantoms: Path, tmp_path: Path) -> None:
    model = _padim()
    model.post_processor = PostProcessor()
    with pytest.raises(ValueError, match=r"--model.post_processor anomalib_adfa\.SpecificityPostProcessor"):
        _engine(tmp_path, [CrossFitThreshold()]).fit(model, datamodule=_datamodule(phantoms))


def test_the_cli_takes_the_protocol_and_the_callback(tmp_path: Path) -> None:
    args = [
        *("fit", "--model", "Padim", "--model.backbone", "resnet18", "--model.pre_trained", "false"),
        *("--data", "anomalib_adfa.data.BrainMRI", "--data.root", str(tmp_path), "--data.val_split_mode", "crossfit"),
        *("--trainer.callbacks+=anomalib_adfa.callbacks.CrossFitThreshold", "--trainer.callbacks.folds", "3"),
        *("--default_root_dir", str(tmp_path / "run")),
    ]
    cli = AnomalibCLI(args=args, run=False)
    assert cli.datamodule.val_split_mode == "crossfit"
    callbacks = cli.config_init["fit"]["trainer"]["callbacks"]
    (callback,) = [c for c in callbacks if isinstance(c, CrossFitThreshold)]
    assert callback.folds == 3


def test_validation_based_epoch_selection_is_refused(phantoms: Path, tmp_path: Path) -> None:
    assert set(_VALIDATION_QUANTITIES) == {monitor for monitor, _ in SELECTION_QUANTITIES.values()}
    callbacks = [CrossFitThreshold(), LabelFreeCheckpoint(quantity="normal_score")]
    with pytest.raises(ValueError, match="LabelFreeCheckpoint selects epochs on a validation set"):
        _engine(tmp_path, callbacks).fit(_padim(), datamodule=_datamodule(phantoms))
