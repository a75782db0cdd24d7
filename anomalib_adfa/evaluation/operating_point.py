"""The decision first: ``anomalib test`` leads with the operating point that ``pred_label`` applies.

:class:`OperatingPointEvaluator` is anomalib's :class:`~anomalib.metrics.Evaluator` that, at the end of testing,
prints (before Lightning's alphabetical metric table) and logs:

- test sensitivity (abnormal images flagged) and specificity (normal images cleared) of ``pred_label``, with their
  counts and 95 % exact binomial (Clopper-Pearson) intervals (:func:`.clopper_pearson`);
- the target specificity, ``n`` (the normal images behind the threshold) and where they came from (held-out
  validation normals, out-of-fold scores, or the test set itself);
- the threshold in the units of the score CSV and of the exported model (the normalised score, 0.5 with
  :class:`~anomalib_adfa.evaluation.post_processing.SpecificityPostProcessor`), with the raw threshold in brackets.

Logged as ``image_Sensitivity_CI_low``/``_high``, ``image_Specificity_CI_low``/``_high``,
``image_threshold_normalized``, ``image_threshold_raw``, ``image_threshold_normals`` and
``image_target_specificity`` (so they are in ``trainer.callback_metrics``, the run's ``run.json`` and the report).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from anomalib.metrics import Evaluator
from lightning.pytorch import LightningModule, Trainer
from torchmetrics.classification import BinaryStatScores

from anomalib_adfa.evaluation.conformal import Interval, clopper_pearson, min_calibration_normals

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatingPointSummary:
    """Test performance at the post-processor's threshold, and how that threshold was set.

    Attributes:
        flagged: Abnormal test images with ``pred_label`` 1 (true positives), of ``abnormal``.
        abnormal: Abnormal test images.
        cleared: Normal test images with ``pred_label`` 0 (true negatives), of ``normal``.
        normal: Normal test images.
        threshold_normalized: Threshold on the scores the model outputs (score CSV, exported model).
        threshold_raw: Threshold on the raw model scores (``nan`` when the post-processor has none).
        target_specificity: Target of the threshold (``nan`` for a post-processor without one).
        calibration_normals: ``n``, normal images behind the threshold (0 when unknown).
        calibration: Where they came from.
    """

    flagged: int
    abnormal: int
    cleared: int
    normal: int
    threshold_normalized: float
    threshold_raw: float
    target_specificity: float = math.nan
    calibration_normals: int = 0
    calibration: str = ""

    @property
    def sensitivity(self) -> float:
        """Flagged abnormal / abnormal (``nan`` without abnormal test images)."""
        return self.flagged / self.abnormal if self.abnormal else math.nan

    @property
    def specificity(self) -> float:
        """Cleared normal / normal (``nan`` without normal test images)."""
        return self.cleared / self.normal if self.normal else math.nan

    @property
    def sensitivity_ci(self) -> Interval:
        """95 % Clopper-Pearson interval of :attr:`sensitivity`."""
        return clopper_pearson(self.flagged, self.abnormal)

    @property
    def specificity_ci(self) -> Interval:
        """95 % Clopper-Pearson interval of :attr:`specificity`."""
        return clopper_pearson(self.cleared, self.normal)

    def lines(self) -> list[str]:
        """Return the summary as printed by ``anomalib test``."""
        sens, spec = self.sensitivity_ci, self.specificity_ci
        raw = "" if math.isnan(self.threshold_raw) else f" [raw {self.threshold_raw:.6g}]"
        lines = [
            f"Operating point: pred_label = 1 when the score > {self.threshold_normalized:.4g}{raw} (scores as in the "
            "score CSV and the exported model)",
        ]
        if not math.isnan(self.target_specificity):
            source = f" ({self.calibration})" if self.calibration else ""
            count = f"n = {self.calibration_normals}" if self.calibration_normals else "n (not recorded)"
            lines.append(
                f"  threshold set at target specificity {self.target_specificity:g} on {count} normal images{source}"
            )
        lines += [
            f"  test sensitivity {self.sensitivity:.3f} ({self.flagged}/{self.abnormal} abnormal flagged), 95% CI "
            f"[{sens.low:.3f}, {sens.high:.3f}]",
            f"  test specificity {self.specificity:.3f} ({self.cleared}/{self.normal} normal cleared), 95% CI "
            f"[{spec.low:.3f}, {spec.high:.3f}]",
            "  (exact binomial Clopper-Pearson intervals over the test images)",
        ]
        return lines

    def metrics(self, prefix: str = "image_") -> dict[str, float]:
        """Values to log, by name."""
        return {
            f"{prefix}Sensitivity_CI_low": self.sensitivity_ci.low,
            f"{prefix}Sensitivity_CI_high": self.sensitivity_ci.high,
            f"{prefix}Specificity_CI_low": self.specificity_ci.low,
            f"{prefix}Specificity_CI_high": self.specificity_ci.high,
            f"{prefix}threshold_normalized": self.threshold_normalized,
            f"{prefix}threshold_raw": self.threshold_raw,
            f"{prefix}threshold_normals": float(self.calibration_normals),
            f"{prefix}target_specificity": self.target_specificity,
        }


def thresholds(post_processor: Any) -> tuple[float, float]:
    """``(normalised, raw)`` image threshold of a post-processor; both ``nan`` when it has none.

    The normalised threshold is anomalib's ``normalized_image_threshold`` when the post-processor normalises
    (and was fitted), else the raw one, which is then what the model outputs are compared with.
    """
    raw_tensor = getattr(post_processor, "image_threshold", None)
    raw = float(raw_tensor) if isinstance(raw_tensor, torch.Tensor) and raw_tensor.numel() == 1 else math.nan
    fitted = not math.isnan(float(getattr(post_processor, "image_min", torch.tensor(math.nan))))
    if getattr(post_processor, "enable_normalization", False) and fitted:
        return float(post_processor.normalized_image_threshold), raw
    return raw, raw


class OperatingPointEvaluator(Evaluator):
    """anomalib's evaluator that leads the test output with the operating point (see the module docstring).

    Args:
        *args: anomalib :class:`~anomalib.metrics.Evaluator` arguments (``val_metrics``, ``test_metrics``, ...).
        **kwargs: Evaluator keyword arguments.

    Example:
        >>> from anomalib.models import Padim
        >>> from anomalib_adfa.evaluation.metrics import clinical_test_metrics
        >>> model = Padim(evaluator=OperatingPointEvaluator(test_metrics=clinical_test_metrics()))
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decisions = BinaryStatScores()
        self.summary: OperatingPointSummary | None = None

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start counting decisions afresh."""
        del trainer, pl_module
        self.decisions.reset()
        self.summary = None

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Update anomalib's metrics, and count the batch's decisions (``pred_label`` against ``gt_label``)."""
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if batch.pred_label is not None and batch.gt_label is not None:
            labels = batch.gt_label.reshape(-1).long()
            self.decisions.update(batch.pred_label.reshape(-1).long().to(labels.device), labels)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print and log the operating point, then log anomalib's metrics that were updated."""
        if self.decisions.update_called:
            tp, fp, tn, fn, _ = (int(value) for value in self.decisions.compute())  # synchronised across devices
            self.summary = summarise(getattr(pl_module, "post_processor", None), tp, fp, tn, fn)
            text = "\n".join(self.summary.lines())
            if trainer.is_global_zero:
                print(text)
            for name, value in self.summary.metrics().items():
                pl_module.log(name, value)
        # As anomalib's Evaluator, but only the metrics that received data: torchmetrics warns for each one never
        # updated (the four pixel metrics of a test set without masks), and they have no value to log.
        for metric in self.test_metrics:
            if not metric.update_called:
                continue
            self.log(metric.name, metric)
            if trainer.barebones:  # anomalib's way of filling the results when logging is disabled
                value = metric.compute()
                trainer.callback_metrics[metric.name] = value
                trainer.logged_metrics[metric.name] = value


def summarise(post_processor: Any, tp: int, fp: int, tn: int, fn: int) -> OperatingPointSummary:
    """Build the :class:`OperatingPointSummary` of a post-processor and the test confusion counts.

    Warns when the threshold rests on fewer normal images than the target needs (``n < 1 / (1 - q) - 1``).
    """
    normalized, raw = thresholds(post_processor)
    target = getattr(post_processor, "target_specificity", None)
    stats = getattr(post_processor, "image_threshold_stats", None) or {}
    count = int(stats.get("normal_count", 0))
    if target is not None and 0 < count < min_calibration_normals(target):
        logger.warning(
            "The threshold rests on n = %d normal images, fewer than the %d that target specificity %s needs "
            "(n >= 1/(1-q) - 1): a new normal image may be flagged with probability up to 1/(n+1) = %.3f",
            count,
            min_calibration_normals(target),
            target,
            1 / (count + 1),
        )
    return OperatingPointSummary(
        flagged=tp,
        abnormal=tp + fn,
        cleared=tn,
        normal=tn + fp,
        threshold_normalized=normalized,
        threshold_raw=raw,
        target_specificity=float(target) if target is not None else math.nan,
        calibration_normals=count,
        calibration=str(stats.get("calibration", "")),
    )
