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
"""

from __future__ import annotations

import torch
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
