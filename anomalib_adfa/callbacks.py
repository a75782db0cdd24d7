"""Lightning callbacks for running ADFA with anomalib: a score table, and label-free checkpoint selection.

anomalib's ``predict`` saves heatmap overlays (ADFA's visualiser: under ``<run>/predictions/<n>/images``, see
:mod:`anomalib_adfa.outputs`) but no table of scores. :class:`EvaluationRecorder` keeps the raw test scores, maps
and masks (for pixel metrics and ``anomalib-adfa report``). :class:`ScoreCSVWriter` adds
``<run>/predictions/<n>/scores.csv``, for ``Engine.predict`` and for the CLI, where it is appended to the trainer's
callbacks (the model options must match the checkpoint's architecture)::

    anomalib predict --model Adfa <the training's --model options> --ckpt_path model.ckpt
        --data path/to/images --trainer.callbacks+=anomalib_adfa.callbacks.ScoreCSVWriter
        [--trainer.callbacks.csv_path my_scores.csv]

``pred_label`` in the table is the post-processor's: with ADFA's default
:class:`~anomalib_adfa.evaluation.post_processing.SpecificityPostProcessor`, the threshold fitted on the validation
normals at the target specificity.

:class:`LabelFreeCheckpoint` keeps the checkpoint of the epoch with the best validation quantity that
needs no real anomaly (the AUROC of held-out normals against synthetic anomalies, under
``--data.val_split_mode synthetic``; or the held-out normals' mean score)::

    anomalib train --model Adfa ... --data.val_split_mode synthetic
        --trainer.callbacks+=anomalib_adfa.callbacks.LabelFreeCheckpoint
        [--trainer.callbacks.quantity normal_score] --trainer.check_val_every_n_epoch 1

:class:`.CrossFitThreshold` (defined in :mod:`.crossfit`, importable from here)
trains the model on every normal and sets its threshold on out-of-fold scores::

    anomalib train --model Adfa ... --data.val_split_mode crossfit
        --trainer.callbacks+=anomalib_adfa.callbacks.CrossFitThreshold [--trainer.callbacks.folds 5]
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from anomalib.callbacks.checkpoint import ModelCheckpoint
from anomalib.data import Batch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn import functional as F  # noqa: N812

from anomalib_adfa.errors import ConfigurationError
from anomalib_adfa.evaluation.crossfit import CrossFitThreshold
from anomalib_adfa.evaluation.metrics import exact_auroc
from anomalib_adfa.evaluation.operating_point import thresholds
from anomalib_adfa.evaluation.pixel_metrics import threshold_label
from anomalib_adfa.mask_frame import crop_box, to_image_frame, transform_geometry
from anomalib_adfa.outputs import prediction_folder

__all__ = ["CrossFitThreshold", "EvaluationRecorder", "LabelFreeCheckpoint", "ScoreCSVWriter"]

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("image_path", "pred_score", "pred_label")


class ScoreCSVWriter(Callback):
    """Write one CSV row per predicted image: its path, normalised score and predicted label.

    anomalib's post-processor (a model callback, so it runs after trainer callbacks) normalises and
    thresholds each prediction batch in place at ``on_predict_batch_end``. The writer therefore
    reads a batch only once the next batch starts, or prediction ends, when the post-processor has
    run on it; it keeps one batch and the rows, not the images of the whole run.

    Args:
        csv_path: Output file; by default ``scores.csv`` in this prediction run's own folder,
            ``<run of the checkpoint>/predictions/<n>/`` (:func:`~anomalib_adfa.outputs.prediction_folder`, where
            ADFA's visualiser writes its images too); relative paths are taken relative to that folder. An existing
            file is never replaced: the error names it. With several processes each rank writes its own share to
            ``<stem>.rank<r>.csv``.
    """

    def __init__(self, csv_path: str | Path = "scores.csv") -> None:
        super().__init__()
        self.csv_path = Path(csv_path)
        self._pending: Batch | None = None
        self._rows: list[tuple[str, float, int | str]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._pending = None
        self._rows = []

    def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs
        self._collect_pending()

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any) -> None:
        del trainer, pl_module, args
        self._pending = outputs

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        self._collect_pending()
        path = self.csv_path if self.csv_path.is_absolute() else prediction_folder(trainer) / self.csv_path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = path.open("x", newline="")
        except FileExistsError as error:
            msg = f"--trainer.callbacks.csv_path: {path} exists; give a new file name (nothing is overwritten)"
            raise ConfigurationError(msg) from error
        with handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(self._rows)
        logger.info("Prediction scores of %d image(s) written to %s", len(self._rows), path)
        self._rows = []

    def _collect_pending(self) -> None:
        """Turn the held batch into rows (``pred_label`` is empty when thresholding is disabled)."""
        batch, self._pending = self._pending, None
        if batch is None:
            return
        scores = batch.pred_score.detach().float().reshape(-1).cpu().tolist()
        labels = (
            batch.pred_label.reshape(-1).int().cpu().tolist() if batch.pred_label is not None else [""] * len(scores)
        )
        paths = batch.image_path if batch.image_path is not None else [""] * len(scores)
        self._rows.extend(zip((str(p) for p in paths), scores, labels, strict=True))


SelectionQuantity = Literal["synthetic_auroc", "synthetic_separation", "normal_score"]

SELECTION_QUANTITIES: dict[str, tuple[str, str]] = {
    "synthetic_auroc": ("val_synthetic_AUROC", "max"),
    "synthetic_separation": ("val_synthetic_separation", "max"),
    "normal_score": ("val_normal_score", "min"),
}
"""Logged name and direction of each label-free validation quantity."""


def label_free_quantity(scores: torch.Tensor, labels: torch.Tensor, quantity: SelectionQuantity) -> float:
    """Compute a validation quantity that uses no real anomaly.

    Args:
        scores: ``(N,)`` raw image scores of the validation set.
        labels: ``(N,)`` labels: 0 held-out normal, 1 synthetic anomaly.
        quantity: ``"synthetic_auroc"`` (normals against synthetic anomalies; higher is better; saturates at 1
            when the synthetic anomalies are easy), ``"synthetic_separation"`` (``(mean synthetic score - mean
            normal score) / std of the normal scores``, a scale-free margin that does not saturate; higher is
            better) or ``"normal_score"`` (mean score of the normals; lower is better, but its scale changes as
            ADFA adapts its descriptor). ``benchmarks/results/selection_study`` measures how each tracks test AUROC.

    Returns:
        The quantity.

    Raises:
        ValueError: When the validation set lacks the images the quantity needs.
    """
    normal = labels.flatten() == 0
    if quantity == "normal_score":
        if not normal.any():
            msg = "quantity 'normal_score' needs normal validation images (val_split_mode from_train or synthetic)"
            raise ValueError(msg)
        return float(scores.flatten()[normal].double().mean())
    if normal.sum() < 2 or normal.all():
        msg = (
            f"quantity {quantity!r} needs at least two normal and one synthetic-anomaly validation image: use "
            "--data.val_split_mode synthetic (or quantity 'normal_score')"
        )
        raise ValueError(msg)
    if quantity == "synthetic_separation":
        normal_scores, synthetic_scores = scores.flatten()[normal].double(), scores.flatten()[~normal].double()
        spread = normal_scores.std().clamp_min(torch.finfo(torch.float64).tiny)
        return float((synthetic_scores.mean() - normal_scores.mean()) / spread)
    return exact_auroc(scores, labels)


class LabelFreeCheckpoint(ModelCheckpoint):
    """Checkpoint selection by a validation quantity that needs no real anomaly.

    Collects the raw validation image scores (trainer callbacks run before the model's post-processor,
    which does not change them during validation anyway), logs :func:`label_free_quantity` as
    ``val_synthetic_separation``, ``val_synthetic_AUROC`` or ``val_normal_score`` at the end of each
    validation epoch, and keeps the checkpoint that is best by it. Being an anomalib ``ModelCheckpoint``,
    it replaces the engine's default one, so ``anomalib train`` tests the selected checkpoint (with the
    thresholds fitted at that epoch).

    Args:
        quantity: ``"synthetic_separation"`` (default), ``"synthetic_auroc"`` (both need
            ``val_split_mode=synthetic``) or ``"normal_score"``; see :func:`label_free_quantity`.
        dirpath: Folder of the checkpoint; default ``<run>/weights/lightning`` as anomalib's.
        filename: File name without extension (default ``model``, as anomalib's).
        **kwargs: Other :class:`~lightning.pytorch.callbacks.ModelCheckpoint` options (``monitor`` and
            ``mode`` are set from ``quantity``).

    Raises:
        ValueError: For an unknown ``quantity``; at validation, when the validation set lacks the images it needs.
    """

    def __init__(
        self,
        quantity: SelectionQuantity = "synthetic_separation",
        dirpath: str | Path | None = None,
        filename: str = "model",
        **kwargs: Any,
    ) -> None:
        if quantity not in SELECTION_QUANTITIES:
            msg = f"unknown selection quantity {quantity!r}; choose from {sorted(SELECTION_QUANTITIES)}"
            raise ValueError(msg)
        monitor, mode = SELECTION_QUANTITIES[quantity]
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, **kwargs)
        self.quantity: SelectionQuantity = quantity
        self.history: list[tuple[int, float]] = []
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "weights" / "lightning")
        super().setup(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._scores, self._labels = [], []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any) -> None:
        del trainer, pl_module, args
        self._scores.append(outputs.pred_score.detach().flatten().cpu())
        self._labels.append(outputs.gt_label.detach().flatten().cpu())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Only validation inside fit selects; engine.validate / test runs leave the history alone.
        if not self._scores or trainer.state.fn != TrainerFn.FITTING:
            return
        scores = pl_module.all_gather(torch.cat(self._scores)).flatten()
        labels = pl_module.all_gather(torch.cat(self._labels)).flatten()
        value = label_free_quantity(scores.cpu(), labels.cpu(), self.quantity)
        self.history.append((trainer.current_epoch, value))
        pl_module.log(self.monitor, value)


REPORT_DATA_DIR = "report_data"
"""Folder, below a run folder, where :class:`EvaluationRecorder` saves what ``anomalib-adfa report`` reads."""


class EvaluationRecorder(Callback):
    """Keep every test image's raw score, label, raw anomaly map and mask; optionally save them for a report.

    Pass it to the trainer (``--trainer.callbacks+=anomalib_adfa.callbacks.EvaluationRecorder``), not to the model:
    trainer callbacks run before the model's pre-processor and post-processor, so at batch start this sees the
    image and mask as loaded, and at batch end the model's raw (not normalised) scores and maps.

    Kept in memory, for metrics (:attr:`maps`, :attr:`masks`): maps and masks where they are compared, in
    the pre-processor's frame (see :mod:`anomalib_adfa.mask_frame`): at the model input, or in the image's frame
    when the mask was left there. Saved, when ``save`` is set, to ``<run>/report_data/`` at the end of testing
    (``<run>`` is the trainer's ``default_root_dir``, anomalib's ``results/<Model>/<Dataset>/vN``, unless
    ``output_dir`` is given):

    - ``predictions.csv``: ``index, image_path, gt_label, pred_score`` (raw score), one row per test image;
    - ``thumbnails.npz``: per image ``image_<i>`` (uint8, as loaded, longest side at most ``thumbnail_size``),
      ``map_<i>`` (raw map in the image's frame, float16), ``mask_<i>`` (bool) and ``box_<i>`` (the part of the
      image the model saw: top, left, height, width in thumbnail pixels);
    - ``run.json``: model and dataset names, raw image and pixel thresholds of the post-processor and where they
      come from, the mask resolution and the test metrics anomalib logged.

    Args:
        save: Write ``report_data/`` at the end of testing.
        output_dir: Folder to write ``report_data/`` into, instead of the trainer's ``default_root_dir``.
        thumbnail_size: Longest side of saved thumbnails.
        label: Name of the run in the report (default: the model's class name).
    """

    def __init__(
        self,
        save: bool = True,
        output_dir: str | Path | None = None,
        thumbnail_size: int = 128,
        label: str | None = None,
    ) -> None:
        super().__init__()
        self.save = save
        self.label = label
        self.summary_path: Path | None = None
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.thumbnail_size = thumbnail_size
        self._reset()

    def _reset(self) -> None:
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.paths: list[str] = []
        self.maps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self._thumbnails: dict[str, np.ndarray] = {}
        self._loaded: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._reset()

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Batch, *args: Any) -> None:
        del trainer, pl_module, args
        mask = batch.gt_mask.detach().cpu().clone() if batch.gt_mask is not None else None
        self._loaded = (batch.image.detach().cpu().clone(), mask)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any) -> None:
        del trainer, args
        images, loaded_masks = self._loaded or (outputs.image, outputs.gt_mask)
        raw = outputs.anomaly_map.detach().cpu().float() if outputs.anomaly_map is not None else None
        count = int(outputs.pred_score.numel())
        paths = list(outputs.image_path) if outputs.image_path is not None else [""] * count
        geometry = _frame_geometry(pl_module)
        frame = (images.shape[-2], images.shape[-1])
        in_frame = raw
        if raw is not None and raw.shape[-2:] != frame:
            if geometry is None:
                msg = f"cannot place the {tuple(raw.shape[-2:])} anomaly maps in the {frame} image frame"
                raise ValueError(msg)
            in_frame = to_image_frame(raw.reshape(count, 1, *raw.shape[-2:]), frame, *geometry)
        if raw is not None and outputs.gt_mask is not None:
            compared = outputs.gt_mask.detach().cpu()
            framed = in_frame if compared.shape[-2:] == frame else raw
            self.maps.append(framed.reshape(count, *compared.shape[-2:]))
            self.masks.append(compared.reshape(count, *compared.shape[-2:]).bool())
        start = len(self.scores)
        self.scores.extend(outputs.pred_score.detach().float().reshape(-1).cpu().tolist())
        self.labels.extend(outputs.gt_label.reshape(-1).int().cpu().tolist())
        self.paths.extend(str(path) for path in paths)
        if self.save:
            for offset in range(count):
                mask = loaded_masks[offset] if loaded_masks is not None else None
                heat = in_frame[offset] if in_frame is not None else None
                self._thumbnail(start + offset, images[offset], mask, heat, frame, geometry)

    def _thumbnail(
        self,
        index: int,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        heat: torch.Tensor | None,
        frame: tuple[int, int],
        geometry: tuple[tuple[int, int], tuple[int, int] | None] | None,
    ) -> None:
        scale = min(1.0, self.thumbnail_size / max(frame))
        size = (max(1, round(frame[0] * scale)), max(1, round(frame[1] * scale)))
        small = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        self._thumbnails[f"image_{index}"] = (small.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        if heat is not None:
            heat_small = F.interpolate(heat.reshape(1, 1, *frame), size=size, mode="bilinear", align_corners=False)
            self._thumbnails[f"map_{index}"] = heat_small[0, 0].numpy().astype(np.float16)
        if mask is not None:
            mask_small = F.interpolate(mask.reshape(1, 1, *frame).float(), size=size, mode="nearest")
            self._thumbnails[f"mask_{index}"] = mask_small[0, 0].numpy() > 0.5
        box = (0, 0, frame[0], frame[1])
        if geometry is not None:
            resized, crop = geometry
            top, left, height, width = crop_box(resized, crop)
            ratio_y, ratio_x = frame[0] / resized[0], frame[1] / resized[1]
            box = (top * ratio_y, left * ratio_x, height * ratio_y, width * ratio_x)
        self._thumbnails[f"box_{index}"] = np.asarray(box, dtype=np.float64) * scale

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.save or trainer.global_rank != 0:
            return
        folder = (self.output_dir or Path(trainer.default_root_dir)) / REPORT_DATA_DIR
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "predictions.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("index", "image_path", "gt_label", "pred_score"))
            writer.writerows(zip(range(len(self.scores)), self.paths, self.labels, self.scores, strict=True))
        np.savez_compressed(folder / "thumbnails.npz", **self._thumbnails)
        summary = _run_summary(trainer, pl_module)
        summary["label"] = self.label or summary["model"]
        self.summary_path = folder / "run.json"
        self.summary_path.write_text(json.dumps(summary, indent=2))

    def add_to_summary(self, **fields: Any) -> None:
        """Add fields to the saved ``run.json`` (e.g. metrics computed after testing); nothing when not saved."""
        if self.summary_path is None:
            return
        summary = json.loads(self.summary_path.read_text())
        self.summary_path.write_text(json.dumps({**summary, **fields}, indent=2, default=str))


def _frame_geometry(pl_module: LightningModule) -> tuple[tuple[int, int], tuple[int, int] | None] | None:
    """Resize and crop sizes of the model's pre-processor, ``None`` when it has no invertible transform."""
    transform = getattr(getattr(pl_module, "pre_processor", None), "transform", None)
    try:
        return transform_geometry(transform)
    except ValueError:
        return None


def _run_summary(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """Summarise the run for the report: names, thresholds and their sources, mask resolution, metrics."""
    post_processor = getattr(pl_module, "post_processor", None)
    datamodule = getattr(trainer, "datamodule", None)
    mode = getattr(datamodule, "val_split_mode", None)

    def raw(name: str) -> float | None:
        value = getattr(post_processor, name, None)
        return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None

    normalized, _ = thresholds(post_processor)
    stats = getattr(post_processor, "image_threshold_stats", None) or {}
    return {
        "model": type(pl_module).__name__,
        "dataset": getattr(datamodule, "name", None) or type(datamodule).__name__,
        "image_threshold": raw("image_threshold"),
        "image_threshold_normalized": normalized,
        "target_specificity": getattr(post_processor, "target_specificity", None),
        "threshold_normals": stats.get("normal_count"),
        "threshold_calibration": stats.get("calibration"),
        "image_threshold_source": threshold_label(post_processor, mode, level="image"),
        "pixel_threshold": raw("pixel_threshold"),
        "pixel_threshold_source": threshold_label(post_processor, mode, level="pixel"),
        "val_split_mode": getattr(mode, "value", mode),
        "mask_resolution": getattr(getattr(pl_module, "pre_processor", None), "mask_resolution", "input"),
        "metrics": {name: float(value) for name, value in trainer.callback_metrics.items() if torch.is_tensor(value)},
    }
