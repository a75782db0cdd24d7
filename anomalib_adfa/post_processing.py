"""A post-processor whose normalised scores rank exactly like the raw ones, so printed AUROCs are the raw AUROCs.

anomalib 2.7's :class:`~anomalib.post_processing.PostProcessor` maps a score ``s`` to
``clamp((s - t) / (max - min) + 0.5, 0, 1)``, with ``t`` the F1 threshold and ``min``/``max`` fitted
on the validation set. Even when the validation set is the test set (``same_as_test``), every score
more than half the range away from ``t`` is clamped to 0 or 1; when ``t`` is near one end of the
range (usual on anomaly-heavy sets such as BrainMRI or BUSI), normal and abnormal scores tie at 1 and
the printed ``image_AUROC`` differs from the AUROC of the raw scores (0.8195 against 0.8211 for a
PaDiM on BrainMRI). Without normalisation, torchmetrics applies a sigmoid to scores outside [0, 1],
which saturates large raw scores to ties instead.

:class:`RankPreservingPostProcessor` keeps anomalib's fitting, threshold and labels, and replaces the
clamp with a logistic curve that has the same value (0.5) and slope at the threshold:
``sigmoid(4 (s - t) / (max - min))``. It is strictly increasing, so AUROC, AUPR and PRO computed on
its output equal those of the raw scores (up to float32 resolution far outside the fitted range).

Thresholds in the gap: anomalib's thresholds are validation scores themselves (the F1 threshold is one
of the scores on the precision-recall curve), so with ``same_as_test`` one test image sits exactly on
the threshold and its label is decided by the last bit of its score: an exported model computing that
score 1e-7 higher flips it. anomalib also labels ``score > threshold`` while the F1 curve counted
``score >= threshold`` as anomalous, so the image on the threshold gets the label the F1 optimum did
not assume. :class:`RankPreservingPostProcessor` moves the fitted image threshold to the midpoint
between it and the next lower validation score: under ``score > threshold`` every validation image then
gets the label the F1 curve gave it, and no validation score lies within half a gap of the threshold.
Subclasses whose threshold rule counts the threshold score itself as normal (a quantile of normal
scores) set :attr:`RankPreservingPostProcessor.gap_side` to ``"above"``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor

# The logistic's slope at 0 is 1/4; this factor makes the slope at the threshold 1 / (max - min), as anomalib's.
_SLOPE = 4.0


class RankPreservingPostProcessor(PostProcessor):
    """anomalib's post-processor with a strictly increasing score normalisation.

    Thresholds and predicted labels are anomalib's (a normalised score above 0.5 is above the F1
    threshold); only the clamp is replaced. Normalisation needs a validation set to fit on (the
    medical datamodules' default ``same_as_test``); without one, scores pass through unchanged.

    Example:
        >>> from anomalib.models import Padim
        >>> model = Padim(post_processor=RankPreservingPostProcessor())

        From the CLI: ``--model.post_processor anomalib_adfa.RankPreservingPostProcessor``.
    """

    gap_side: Literal["below", "above"] = "below"
    """Which gap next to the fitted threshold it moves into: ``"below"`` where the threshold rule counts a score
    equal to the threshold as anomalous (anomalib's F1 threshold), ``"above"`` where it counts it as normal."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._validation_scores: list[torch.Tensor] = []

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Batch, *args: Any, **kwargs: Any) -> None:
        """Fit as anomalib does, and keep the raw image scores for :meth:`threshold_in_gap`."""
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
        if self.enable_thresholding and outputs.pred_score is not None:
            self._validation_scores.append(outputs.pred_score.detach().flatten().cpu())

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Fit the thresholds and the normalisation as anomalib does, then move the image threshold into its gap."""
        super().on_validation_epoch_end(trainer, pl_module)
        if self._validation_scores:
            scores = torch.cat(self._validation_scores)
            self._validation_scores = []
            if not torch.isnan(self._image_threshold):
                self._image_threshold.copy_(self.threshold_in_gap(self._image_threshold, scores, self.gap_side))

    @staticmethod
    def threshold_in_gap(
        threshold: torch.Tensor, scores: torch.Tensor, side: Literal["below", "above"] = "below"
    ) -> torch.Tensor:
        """Midpoint between ``threshold`` and the nearest score below (or above) it; ``threshold`` if there is none.

        Args:
            threshold: Fitted threshold, a scalar on the raw score scale.
            scores: Raw validation scores, shape ``(N,)``.
            side: ``"below"``: the result labels ``score > result`` as ``score >= threshold`` does;
                ``"above"``: as ``score > threshold`` does.

        Returns:
            The threshold, moved into the gap.
        """
        scores = scores.to(threshold.dtype)
        neighbours = scores[scores < threshold] if side == "below" else scores[scores > threshold]
        if neighbours.numel() == 0:
            return threshold
        neighbour = neighbours.max() if side == "below" else neighbours.min()
        midpoint = ((threshold.double() + neighbour.double()) / 2).to(threshold.dtype)
        # Adjacent floats have no midpoint in between: rounding would land on one of them and relabel it.
        return midpoint if min(threshold, neighbour) < midpoint < max(threshold, neighbour) else threshold

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        """Map scores to (0, 1) with ``sigmoid(4 (preds - threshold) / (norm_max - norm_min))``.

        Args:
            preds: Scores or anomaly maps.
            norm_min: Smallest validation score (NaN when not fitted).
            norm_max: Largest validation score (NaN when not fitted).
            threshold: Threshold on the raw scores; the range's midpoint when NaN.

        Returns:
            The normalised scores, or ``preds`` unchanged when no range was fitted.
        """
        if preds is None:
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        scale = torch.where(value_range > 0, value_range, torch.ones_like(value_range)).double()
        normalized = torch.sigmoid(_SLOPE * (preds.double() - threshold.double()) / scale).to(preds.dtype)
        fitted = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(fitted, normalized, preds)
