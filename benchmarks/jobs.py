"""One benchmark job: train and test one model on one dataset with one seed, and measure it.

:class:`MedicalBenchmarkJob` is anomalib's :class:`~anomalib.pipelines.benchmark.job.BenchmarkJob` with what the
medical benchmark needs on top: our datamodules and model builders (anomalib's generator only knows its own), the
raw image scores recorded before anomalib's post-processor normalises them, train/test timing, peak memory, and
errors returned as results instead of being hidden in a log file.

Each job runs under one validation protocol (:data:`PROTOCOLS`); every model gets ADFA's post-processor
(:class:`.SpecificityPostProcessor`: threshold at :data:`TARGET_SPECIFICITY` on the
validation normals) and evaluator, so the operating point and anomalib's printed clinical metrics are comparable.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anomalib.data import AnomalibDataModule
from anomalib.engine import Engine
from anomalib.pipelines.benchmark.job import BenchmarkJob
from lightning import Callback, LightningModule, Trainer, seed_everything

from anomalib_adfa import Adfa
from anomalib_adfa.callbacks import CrossFitThreshold, EvaluationRecorder, LabelFreeCheckpoint
from anomalib_adfa.data import BUSI, BrainMRI, Covid, SIPaKMeD
from anomalib_adfa.evaluation.conformal import clopper_pearson
from anomalib_adfa.evaluation.pixel_metrics import pixel_metrics, threshold_label
from anomalib_adfa.scoring import kl_weight
from benchmarks.metrics import auroc, best_f1, bootstrap_auroc_ci, operating_point
from benchmarks.models import TARGET_SPECIFICITY, UnsupportedModelError, build_model, recommended_selection

DATASETS: dict[str, tuple[type[AnomalibDataModule], str]] = {
    "brainmri": (BrainMRI, "brain_tumor_dataset"),
    "covid": (Covid, "covid19_xray/xray_dataset_covid19"),
    "busi": (BUSI, "Dataset_BUSI_with_GT"),
    "sipakmed": (SIPaKMeD, "sipakmed"),
}
"""Datamodule and default folder (below ``--data-root``) of each dataset."""

PROTOCOLS: dict[str, str] = {
    "paper": "same_as_test",
    "synthetic": "synthetic",
    "from_train": "from_train",
    "crossfit": "crossfit",
}
"""Benchmark protocol -> datamodule ``val_split_mode``. ``paper`` reproduces Table 1; its thresholds are
test-calibrated (the validation set is the test set). ``synthetic`` and ``from_train`` hold out half of the training
normals. ``crossfit`` trains on all of them and sets the threshold on out-of-fold scores of :data:`CROSSFIT_FOLDS` fold
models (:class:`~anomalib_adfa.evaluation.crossfit.CrossFitThreshold`), for every model alike."""

CROSSFIT_FOLDS = 5
"""Fold models of the ``crossfit`` protocol."""

AUROC_TOLERANCE = 0.005
"""Largest accepted gap between our raw-score AUROC and anomalib's ``image_AUROC``."""

CONTROL_MODES = ("untrained", "kl_scalar")
"""ADFA controls scored without training: the untrained descriptor's ADFA score, or its per-image KL scalar."""


@dataclass
class JobSpec:
    """Everything that defines one job.

    Attributes:
        dataset: Key of :data:`DATASETS`.
        model: Model name (see :data:`benchmarks.models.MODEL_NAMES`).
        seed: Seed of the split, the initialisation and the training.
        variant: Name of the ADFA ablation variant, ``""`` for the model's defaults.
        adfa_options: Keyword arguments of the variant for :class:`~anomalib_adfa.Adfa`.
        control: One of :data:`CONTROL_MODES` to score ADFA without training, else ``""``.
        protocol: Validation protocol, a key of :data:`PROTOCOLS`.
    """

    dataset: str
    model: str
    seed: int
    variant: str = ""
    adfa_options: dict[str, Any] = field(default_factory=dict)
    control: str = ""
    protocol: str = "paper"

    @property
    def key(self) -> str:
        """File-name-safe identifier of the job."""
        name = self.model if not self.variant else f"{self.model}-{self.variant}"
        return f"{self.dataset}__{name}__{self.protocol}__seed{self.seed}"


@dataclass(frozen=True)
class JobContext:
    """Settings shared by all jobs of a run.

    Attributes:
        root: Dataset root of each dataset key.
        settings: Factory of the shared model settings, given a job's ADFA options.
        epochs: Training epochs of each model (already capped).
        batch_size: Train and eval batch size.
        report_dir: Where each job saves its test record for the HTML report (``<report_dir>/<job key>/``);
            ``None`` saves nothing.
    """

    root: dict[str, Path]
    settings: Callable[[dict[str, Any]], Any]
    epochs: dict[str, int]
    batch_size: int
    report_dir: Path | None = None


class _ScoreRecorder(Callback):
    """Keep the raw validation and test predictions (this callback runs before the model's post-processor); time them.

    Validation scores are those of the last validation epoch.
    """

    def __init__(self) -> None:
        self.val_scores: list[torch.Tensor] = []
        self.val_labels: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.validation_seconds = 0.0
        self.test_seconds = 0.0
        self._start = 0.0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._start = time.perf_counter()
        self.val_scores, self.val_labels = [], []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        del trainer, pl_module, args
        self.val_scores.append(outputs.pred_score.detach().flatten().cpu().double().clone())
        self.val_labels.append(outputs.gt_label.detach().flatten().cpu().clone())

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self.validation_seconds += time.perf_counter() - self._start

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._start = time.perf_counter()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self.test_seconds = time.perf_counter() - self._start

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        del trainer, pl_module, args
        self.scores.append(outputs.pred_score.detach().flatten().cpu().double().clone())
        self.labels.append(outputs.gt_label.detach().flatten().cpu().clone())


@contextlib.contextmanager
def _peak_rss() -> Iterator[dict[str, float]]:
    """Sample the process's resident memory every 50 ms; yields a dict whose ``"peak_mb"`` is set on exit."""
    result: dict[str, float] = {}
    page = resource.getpagesize()
    statm = Path("/proc/self/statm")
    stop = threading.Event()
    peak = [0]

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], int(statm.read_text().split()[1]) * page)

    sampler = threading.Thread(target=sample, daemon=True) if statm.exists() else None
    if sampler is not None:
        sampler.start()
    try:
        yield result
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
            result["peak_mb"] = peak[0] / 2**20
        else:  # Without /proc: the process's lifetime peak (kilobytes on Linux and most BSDs).
            result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MedicalBenchmarkJob(BenchmarkJob):
    """anomalib's benchmark job for our datamodules and models; returns a flat result dict, also on failure.

    Args:
        spec: What to run.
        context: Settings shared by the run.
        accelerator: Lightning accelerator.
    """

    name = "medical_benchmark"

    def __init__(self, spec: JobSpec, context: JobContext, accelerator: str = "cpu") -> None:
        self.spec = spec
        self.context = context
        flat_cfg = {
            "dataset": spec.dataset,
            "model": spec.model,
            "variant": spec.variant,
            "protocol": spec.protocol,
            "seed": spec.seed,
        }
        # The model and datamodule are built in run(), so that building them is timed and its errors are reported.
        super().__init__(accelerator=accelerator, model=None, datamodule=None, seed=spec.seed, flat_cfg=flat_cfg)

    def run(self, task_id: int | None = None) -> dict[str, Any]:
        """Run the job; never raises for a failing model.

        Args:
            task_id: Unused (serial execution only).

        Returns:
            ``flat_cfg`` plus ``status`` (``"ok"``, ``"unsupported"`` or ``"error"``), ``error`` and the metrics.
        """
        del task_id
        result: dict[str, Any] = {**self.flat_cfg, "status": "ok", "error": ""}
        start = time.perf_counter()
        try:
            with _peak_rss() as memory:
                result.update(self._run())
            result["peak_rss_mb"] = round(memory["peak_mb"], 1)
        except UnsupportedModelError as err:
            result.update(status="unsupported", error=str(err))
        except Exception as err:  # every failure becomes a reported result row
            result.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        finally:
            self.model = None
            self.datamodule = None
            gc.collect()
        result["job_s"] = round(time.perf_counter() - start, 2)
        return result

    @staticmethod
    def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
        """One row per job; unlike the parent's, rows may have different keys (failed jobs have no metrics).

        Args:
            results: Result dicts of :meth:`run`.

        Returns:
            The results table.
        """
        return pd.DataFrame(results)

    def _datamodule(self) -> AnomalibDataModule:
        datamodule_class, _ = DATASETS[self.spec.dataset]
        size = self.context.batch_size
        return datamodule_class(
            root=self.context.root[self.spec.dataset],
            seed=self.spec.seed,
            train_batch_size=size,
            eval_batch_size=size,
            num_workers=0,
            # The per-job decode check of every file would double the data loading; unreadable files still fail.
            check_images=False,
            val_split_mode=PROTOCOLS[self.spec.protocol],
        )

    def _run(self) -> dict[str, Any]:
        seed_everything(self.spec.seed, verbose=False)
        self.datamodule = self._datamodule()
        self.model = build_model(self.spec.model, self.context.settings(self.spec.adfa_options))
        if self.spec.control:
            return self._run_control()
        epochs = self.context.epochs[self.spec.model]
        recorder = _ScoreRecorder()
        report_dir = self.context.report_dir
        label = self.spec.variant or self.spec.model
        maps = EvaluationRecorder(
            save=report_dir is not None,
            output_dir=report_dir / self.spec.key if report_dir is not None else None,
            label=f"{label} (seed {self.spec.seed})",
        )
        # adfa_recommended keeps the epoch with the best label-free validation quantity; under the paper protocol the
        # validation images are the test images, and crossfit has no validation set, so it keeps the last epoch there.
        quantity = recommended_selection() if self.spec.model == "adfa_recommended" else None
        held_out = self.spec.protocol in ("synthetic", "from_train")
        label_free = held_out and (quantity == "normal_score" or self.spec.protocol == "synthetic")
        selector = LabelFreeCheckpoint(quantity=quantity) if quantity and label_free else None
        crossfit = CrossFitThreshold(CROSSFIT_FOLDS, seed=self.spec.seed) if self.spec.protocol == "crossfit" else None
        extra = [callback for callback in (selector, crossfit) if callback is not None]
        with tempfile.TemporaryDirectory() as temp_dir:
            engine = Engine(
                accelerator=self.accelerator,
                devices=1,
                default_root_dir=temp_dir,
                logger=False,
                max_epochs=epochs,
                # Validate (to fit the post-processor) once, at the end, unless selecting an epoch by validation.
                check_val_every_n_epoch=1 if selector else epochs,
                callbacks=[recorder, maps, *extra],
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            fit_start = time.perf_counter()
            engine.fit(self.model, datamodule=self.datamodule)
            selected_epoch = engine.trainer.current_epoch
            if selector is not None:
                best = torch.load(selector.best_model_path, map_location="cpu", weights_only=False)
                selected_epoch = int(best["epoch"]) + 1
                # Restores the selected weights and post-processor, and records that epoch's validation scores.
                engine.validate(self.model, datamodule=self.datamodule, ckpt_path=selector.best_model_path)
            test_start = time.perf_counter()
            test_metrics = engine.test(self.model, datamodule=self.datamodule, verbose=False)[0]
            test_end = time.perf_counter()
            epochs_run = engine.trainer.current_epoch
        scores = torch.cat(recorder.scores).numpy()
        labels = torch.cat(recorder.labels).numpy().astype(int)
        result = {
            "epochs": epochs_run,
            "selected_epoch": selected_epoch,
            "selection": f"{quantity} (validation)" if selector else "last epoch",
            **self.datamodule.protocol,
            "fit_s": round(test_start - fit_start, 2),
            "train_s": round(test_start - fit_start - recorder.validation_seconds, 2),
            "test_s": round(test_end - test_start, 2),
            "test_ms_per_image": round(1000 * recorder.test_seconds / len(scores), 2),
            **_score_metrics(labels, scores),
            **self._operating_point(recorder, labels, scores, crossfit),
            **{f"anomalib_{name}": float(value) for name, value in test_metrics.items()},
        }
        if maps.masks:
            result.update(self._pixel_metrics(maps))
        result["auroc_mismatch"] = bool(abs(result["image_AUROC"] - result["anomalib_image_AUROC"]) > AUROC_TOLERANCE)
        return result

    def _pixel_metrics(self, maps: EvaluationRecorder) -> dict[str, Any]:
        """Pixel metrics with bootstrap CIs from the raw maps; Dice/IoU at the post-processor's pixel threshold."""
        post_processor = self.model.post_processor
        threshold = float(post_processor.pixel_threshold)
        source = threshold_label(post_processor, self.datamodule.val_split_mode)
        result = pixel_metrics(
            torch.cat(maps.maps), torch.cat(maps.masks), threshold, paths=maps.paths, labels=maps.labels
        )
        columns = result.as_dict(source)
        maps.add_to_summary(pixel_metrics=columns)
        return columns

    def _operating_point(
        self,
        recorder: _ScoreRecorder,
        labels: np.ndarray,
        scores: np.ndarray,
        crossfit: CrossFitThreshold | None = None,
    ) -> dict[str, Any]:
        """Test sensitivity/specificity at the threshold set on normals, CIs, calibration gap, threshold check.

        The normals behind the threshold are the validation normals, or under ``crossfit`` the out-of-fold scores.
        Intervals: bootstrap (resampling those normals and the test images) and Clopper-Pearson (test images only).
        A diagnostic, not a decision: the share of test normals above the median of the normals behind the threshold.
        """
        if crossfit is not None:
            val_scores = val_normal = crossfit.scores.numpy()
        else:
            val_scores = torch.cat(recorder.val_scores).numpy()
            val_normal = val_scores[torch.cat(recorder.val_labels).numpy() == 0]
        point = operating_point(val_normal, labels, scores, TARGET_SPECIFICITY, val_scores=val_scores)
        fitted = float(self.model.post_processor.image_threshold)
        flagged, abnormal = int((scores[labels == 1] > point.threshold).sum()), int((labels == 1).sum())
        cleared, normal = int((scores[labels == 0] <= point.threshold).sum()), int((labels == 0).sum())
        sensitivity_cp, specificity_cp = clopper_pearson(flagged, abnormal), clopper_pearson(cleared, normal)
        return {
            "target_specificity": TARGET_SPECIFICITY,
            "threshold_normals": int(val_normal.size),
            "threshold": point.threshold,
            "test_sensitivity_cp_low": sensitivity_cp.low,
            "test_sensitivity_cp_high": sensitivity_cp.high,
            "test_specificity_cp_low": specificity_cp.low,
            "test_specificity_cp_high": specificity_cp.high,
            "test_sensitivity": point.sensitivity,
            "test_sensitivity_ci_low": point.sensitivity_ci.low,
            "test_sensitivity_ci_high": point.sensitivity_ci.high,
            "test_specificity": point.specificity,
            "test_specificity_ci_low": point.specificity_ci.low,
            "test_specificity_ci_high": point.specificity_ci.high,
            "calibration_gap": point.specificity - TARGET_SPECIFICITY,
            # 0.5 when the normals behind the threshold score like new normals (exchangeable); below it when the
            # model that scored them (a fold model under crossfit) scores normals higher than the deployed model.
            "test_normals_above_calibration_median": float((scores[labels == 0] > np.median(val_normal)).mean()),
            "threshold_mismatch": bool(not np.isclose(fitted, point.threshold, rtol=1e-5, atol=1e-6)),
        }

    def _run_control(self) -> dict[str, Any]:
        """Score ADFA without training: centres from the untrained descriptor, then the chosen score."""
        model = self.model
        if not isinstance(model, Adfa) or self.spec.control not in CONTROL_MODES:
            msg = f"control {self.spec.control!r} needs model 'adfa' and one of {CONTROL_MODES}"
            raise ValueError(msg)
        self.datamodule.setup()
        network = model.model.eval()
        transform = model.pre_processor.transform

        def descriptors(images: torch.Tensor) -> torch.Tensor:
            return network.describe(network.extract_features(transform(images)))

        fit_start = time.perf_counter()
        with torch.no_grad():
            total = torch.stack(
                [
                    descriptors(batch.image).sum(dim=0, dtype=torch.float64)
                    for batch in self.datamodule.train_dataloader()
                ]
            ).sum(dim=0)
            network.set_centers((total / len(self.datamodule.train_data)).float().flatten(1).T)
            test_start = time.perf_counter()
            scores, labels = [], []
            for batch in self.datamodule.test_dataloader():
                if self.spec.control == "kl_scalar":
                    patches = descriptors(batch.image).flatten(2).transpose(1, 2)
                    scores.append(kl_weight(patches, network.centers).flatten().double())
                else:
                    scores.append(network(transform(batch.image)).pred_score.double())
                labels.append(batch.gt_label.flatten())
        test_end = time.perf_counter()
        score_array = torch.cat(scores).numpy()
        return {
            "epochs": 0,
            "fit_s": round(test_start - fit_start, 2),
            "train_s": 0.0,
            "test_ms_per_image": round(1000 * (test_end - test_start) / len(score_array), 2),
            **_score_metrics(torch.cat(labels).numpy().astype(int), score_array),
        }


def _score_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    f1, _ = best_f1(labels, scores)
    interval = bootstrap_auroc_ci(labels, scores)
    return {
        "n_test": int(labels.size),
        "n_anomalous": int(labels.sum()),
        "image_AUROC": auroc(labels, scores),
        "image_AUROC_ci_low": interval.low,
        "image_AUROC_ci_high": interval.high,
        "image_F1_best": f1,
    }
