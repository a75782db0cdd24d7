"""Image-level test metrics a clinic reads, as anomalib metrics built on torchmetrics.

At the operating point (``pred_label``, i.e. the post-processor's threshold; with ADFA's default
:class:`~anomalib_adfa.evaluation.post_processing.SpecificityPostProcessor` a threshold fixed on validation
normals): :class:`Sensitivity`, :class:`Specificity`, :class:`PPV`, :class:`NPV` and
:class:`BalancedAccuracy`. Threshold-free (``pred_score``): anomalib's ``AUROC``, :class:`AUPR` and
:class:`SensitivityAtSpecificity` (the best sensitivity at a test specificity of at least 90 / 95 /
99 %, i.e. with the threshold chosen on the test labels: an upper bound, not an operating point).

Each class is a torchmetrics metric wrapped as an :class:`~anomalib.metrics.AnomalibMetric`, so it
reads its fields from anomalib batches and the :class:`~anomalib.metrics.Evaluator` logs it as
``<prefix><name>`` (e.g. ``image_Sensitivity``). Use :func:`clinical_test_metrics` for the set ADFA's
evaluator prints; with another anomalib model::

    from anomalib.metrics import Evaluator
    model = Padim(evaluator=Evaluator(test_metrics=clinical_test_metrics()))
"""

from __future__ import annotations

from typing import Any

import torch
from anomalib.metrics import AUROC, AnomalibMetric, F1Score
from torchmetrics.classification import (
    BinaryAveragePrecision,
    BinaryNegativePredictiveValue,
    BinaryPrecision,
    BinaryRecall,
    BinarySensitivityAtSpecificity,
    BinarySpecificity,
    BinaryStatScores,
)
from torchmetrics.functional.classification import binary_auroc


def exact_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact AUROC of raw scores (torchmetrics' ``binary_auroc``, ``thresholds=None``; ties count one half).

    The package's one AUROC of raw scores: image scores, pixel maps, label-free validation, reports. torchmetrics
    passes scores outside [0, 1] through a sigmoid, which saturates large raw anomaly scores to ties; min-max
    scaling in float64 first keeps every distinct raw score distinct and their order unchanged.

    Args:
        scores: Raw scores of any shape, e.g. ``(N,)`` image scores or ``(N, H, W)`` maps.
        labels: Labels of the same number of elements, 1 for anomalous; both classes must be present.

    Returns:
        The AUROC.
    """
    scores = torch.as_tensor(scores).double().flatten()
    low, high = scores.min(), scores.max()
    scaled = (scores - low) / (high - low) if high > low else torch.zeros_like(scores)
    return float(binary_auroc(scaled, torch.as_tensor(labels).flatten().long()))


TEST_SPECIFICITIES = (0.90, 0.95, 0.99)
"""Test specificities at which :func:`clinical_test_metrics` reports the best achievable sensitivity."""


class _ImageInputs:
    """Flatten per-image predictions and labels: anomalib models give scores as ``(B,)`` or ``(B, 1)``."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds.reshape(-1), target.reshape(-1))  # type: ignore[misc]


class Sensitivity(AnomalibMetric, _ImageInputs, BinaryRecall):  # type: ignore[misc]
    """Sensitivity (recall, true-positive rate) of ``pred_label``: TP / (TP + FN)."""


class Specificity(AnomalibMetric, _ImageInputs, BinarySpecificity):  # type: ignore[misc]
    """Specificity (true-negative rate) of ``pred_label``: TN / (TN + FP)."""


class PPV(AnomalibMetric, _ImageInputs, BinaryPrecision):  # type: ignore[misc]
    """Positive predictive value (precision) of ``pred_label``: TP / (TP + FP); 0 when nothing is flagged."""


class NPV(AnomalibMetric, _ImageInputs, BinaryNegativePredictiveValue):  # type: ignore[misc]
    """Negative predictive value of ``pred_label``: TN / (TN + FN); 0 when nothing is cleared."""


class _BinaryBalancedAccuracy(BinaryStatScores):
    """Mean of sensitivity and specificity, from torchmetrics' confusion counts (it has no binary class for it)."""

    def compute(self) -> torch.Tensor:
        """``(TP / (TP + FN) + TN / (TN + FP)) / 2``; a class absent from the targets contributes 0."""
        tp, fp, tn, fn = self._final_state()
        sensitivity = tp / (tp + fn) if tp + fn > 0 else torch.zeros_like(tp, dtype=torch.float)
        specificity = tn / (tn + fp) if tn + fp > 0 else torch.zeros_like(tn, dtype=torch.float)
        return (sensitivity.float() + specificity.float()) / 2


class BalancedAccuracy(AnomalibMetric, _ImageInputs, _BinaryBalancedAccuracy):  # type: ignore[misc]
    """Balanced accuracy of ``pred_label``: (sensitivity + specificity) / 2."""


class AUPR(AnomalibMetric, _ImageInputs, BinaryAveragePrecision):  # type: ignore[misc]
    """Area under the precision-recall curve of ``pred_score`` as average precision (step-wise, no interpolation).

    Equals scikit-learn's ``average_precision_score``; anomalib's own ``AUPR`` integrates the curve with the
    trapezoidal rule, which over-rates curves with long steps.
    """


class SensitivityAtSpecificity(AnomalibMetric, _ImageInputs, BinarySensitivityAtSpecificity):  # type: ignore[misc]
    """Highest sensitivity over thresholds whose test specificity is at least ``min_specificity``.

    Logged as ``<prefix>Sensitivity_at_Spec<percent>`` (e.g. ``image_Sensitivity_at_Spec95``); ``compute``
    returns the sensitivity only (torchmetrics also returns the threshold, which the evaluator cannot log).

    Args:
        min_specificity: Lowest admissible specificity, in [0, 1].
        **kwargs: Fields, prefix and torchmetrics options.
    """

    def __init__(self, min_specificity: float, **kwargs: Any) -> None:
        super().__init__(min_specificity=min_specificity, **kwargs)
        self.name = f"{kwargs.get('prefix', '')}Sensitivity_at_Spec{round(100 * min_specificity):d}"

    def compute(self) -> torch.Tensor | None:
        """Return the sensitivity only (``None`` before any update, like anomalib's non-strict metrics)."""
        result = super().compute()
        return result[0] if isinstance(result, tuple) else result


def clinical_test_metrics(prefix: str = "image_") -> list[AnomalibMetric]:
    """Anomalib's default test metrics plus the clinical image-level ones (the order they are printed in).

    Args:
        prefix: Prefix of the image-level metric names.

    Returns:
        Image AUROC and F1 (anomalib's), sensitivity, specificity, PPV, NPV and balanced accuracy at
        ``pred_label``, AUPR and sensitivity at each of :data:`TEST_SPECIFICITIES`, then anomalib's pixel
        AUROC and F1 (skipped on datasets without masks).
    """
    labels = ["pred_label", "gt_label"]
    scores = ["pred_score", "gt_label"]
    return [
        AUROC(fields=scores, prefix=prefix),
        F1Score(fields=labels, prefix=prefix),
        Sensitivity(fields=labels, prefix=prefix),
        Specificity(fields=labels, prefix=prefix),
        PPV(fields=labels, prefix=prefix),
        NPV(fields=labels, prefix=prefix),
        BalancedAccuracy(fields=labels, prefix=prefix),
        AUPR(fields=scores, prefix=prefix),
        *(SensitivityAtSpecificity(level, fields=scores, prefix=prefix) for level in TEST_SPECIFICITIES),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
    ]
