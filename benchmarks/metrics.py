"""Image metrics computed from raw anomaly scores, with bootstrap confidence intervals; operating points.

The metrics here never see anomalib's post-processed (min-max normalised, clipped) scores, so they are a check on
the ``image_AUROC`` that anomalib prints. Pixel metrics are in :mod:`anomalib_adfa.evaluation.pixel_metrics`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import rankdata

from anomalib_adfa.evaluation.conformal import Interval, conformal_rank
from anomalib_adfa.evaluation.post_processing import RankPreservingPostProcessor


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> None:
    if labels.shape != scores.shape or labels.ndim != 1:
        msg = f"labels and scores must be 1-D arrays of equal length, got {labels.shape} and {scores.shape}"
        raise ValueError(msg)
    if not np.isfinite(scores).all():
        msg = "scores contain NaN or infinite values"
        raise ValueError(msg)
    if set(np.unique(labels).tolist()) != {0, 1}:
        msg = "labels must contain both classes, 0 (normal) and 1 (anomalous)"
        raise ValueError(msg)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic (ties count one half).

    Args:
        labels: 1 for anomalous, 0 for normal, shape ``(N,)``.
        scores: Anomaly scores, higher meaning more anomalous, shape ``(N,)``.

    Returns:
        The AUROC in ``[0, 1]``.

    Raises:
        ValueError: If the inputs are not 1-D, not finite, or not both classes are present.
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    _check_binary(labels, scores)
    ranks = rankdata(scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    u_statistic = ranks[labels == 1].sum() - positives * (positives + 1) / 2
    return float(u_statistic / (positives * negatives))


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds ``score >= t`` (an oracle threshold, as anomalib's F1AdaptiveThreshold).

    Args:
        labels: 1 for anomalous, 0 for normal.
        scores: Anomaly scores.

    Returns:
        ``(f1, threshold)``.
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    _check_binary(labels, scores)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_positives = np.cumsum(labels[order])
    predicted = np.arange(1, labels.size + 1)
    # Only the last index of each run of tied scores is a realisable threshold.
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    f1 = 2 * true_positives / (predicted + labels.sum())
    f1 = np.where(last_of_tie, f1, -1.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(sorted_scores[best])


def bootstrap_auroc_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    num_samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the AUROC, resampling normal and anomalous images separately.

    Resampling within each class keeps both classes in every replicate and the class ratio of the test set.

    Args:
        labels: 1 for anomalous, 0 for normal.
        scores: Anomaly scores.
        num_samples: Bootstrap replicates.
        level: Coverage of the interval.
        seed: Seed of the resampling.

    Returns:
        The interval.
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    _check_binary(labels, scores)
    rng = np.random.default_rng(seed)
    positive = scores[labels == 1]
    negative = scores[labels == 0]
    pos_draws = positive[rng.integers(0, positive.size, size=(num_samples, positive.size))]
    neg_draws = negative[rng.integers(0, negative.size, size=(num_samples, negative.size))]
    # AUROC of each replicate by counting pairs, vectorised in chunks to bound memory.
    values = np.empty(num_samples)
    chunk = max(1, 2_000_000 // (positive.size * negative.size))
    for start in range(0, num_samples, chunk):
        pos = pos_draws[start : start + chunk, :, None]
        neg = neg_draws[start : start + chunk, None, :]
        values[start : start + chunk] = ((pos > neg) + 0.5 * (pos == neg)).mean(axis=(1, 2))
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return Interval(float(low), float(high))


class OperatingPoint(NamedTuple):
    """Sensitivity and specificity of test scores at a threshold fixed on validation normals, with 95% CIs.

    The intervals resample the validation normals (refitting the threshold) and the test images of each class, so
    they cover both the threshold's and the test set's sampling error.
    """

    threshold: float
    sensitivity: float
    specificity: float
    sensitivity_ci: Interval
    specificity_ci: Interval


def operating_point(
    val_normal_scores: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    target_specificity: float,
    num_samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    val_scores: np.ndarray | None = None,
) -> OperatingPoint:
    """Test sensitivity/specificity at the validation-normal quantile threshold, with percentile bootstrap CIs.

    The threshold is the validation normals' order statistic of rank
    :func:`~anomalib_adfa.evaluation.conformal.conformal_rank` (a score above it is abnormal), as the post-processor's.

    Args:
        val_normal_scores: Raw scores of the validation normal images, shape ``(M,)``.
        labels: Test labels, 1 for anomalous, shape ``(N,)``.
        scores: Raw test scores, shape ``(N,)``.
        target_specificity: Target specificity of the threshold.
        num_samples: Bootstrap replicates.
        level: Coverage of the intervals.
        seed: Seed of the resampling.
        val_scores: All validation scores (normal and anomalous): when given, the threshold is moved into the gap
            above the quantile as :class:`~anomalib_adfa.SpecificityPostProcessor` does (the bootstrap replicates
            keep the plain quantile).

    Returns:
        The operating point.
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    val_normal_scores = np.sort(np.asarray(val_normal_scores, dtype=np.float64).ravel())
    _check_binary(labels, scores)
    if val_normal_scores.size == 0:
        msg = "no validation normal scores to set the threshold on"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    rank = conformal_rank(val_normal_scores.size, target_specificity)
    threshold = float(val_normal_scores[rank - 1])
    if val_scores is not None:
        gap = RankPreservingPostProcessor.threshold_in_gap
        threshold = float(gap(torch.tensor(threshold), torch.as_tensor(np.asarray(val_scores)).float(), "above"))
    positive, negative = scores[labels == 1], scores[labels == 0]
    val_draws = np.sort(
        val_normal_scores[rng.integers(0, val_normal_scores.size, (num_samples, val_normal_scores.size))]
    )
    thresholds = val_draws[:, rank - 1 : rank]
    pos_draws = positive[rng.integers(0, positive.size, (num_samples, positive.size))]
    neg_draws = negative[rng.integers(0, negative.size, (num_samples, negative.size))]
    sensitivities = (pos_draws > thresholds).mean(axis=1)
    specificities = (neg_draws <= thresholds).mean(axis=1)
    alpha = (1 - level) / 2

    def interval(values: np.ndarray) -> Interval:
        low, high = np.quantile(values, [alpha, 1 - alpha])
        return Interval(float(low), float(high))

    return OperatingPoint(
        threshold=threshold,
        sensitivity=float((positive > threshold).mean()),
        specificity=float((negative <= threshold).mean()),
        sensitivity_ci=interval(sensitivities),
        specificity_ci=interval(specificities),
    )
