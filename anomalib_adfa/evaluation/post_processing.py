"""Post-processors: rank-preserving score normalisation, and operating points at a target specificity.

Normalisation
-------------

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

Operating point
---------------
:class:`SpecificityPostProcessor` (ADFA's default) keeps that normalisation but replaces anomalib's F1
threshold, which needs anomalous validation images and is test-calibrated under ``same_as_test``, by a
threshold fitted on the validation set's *normal* images only (:class:`NormalQuantileThreshold`): a
``pred_label`` of 1 then means "scores above the normal score of conformal rank ``ceil((n + 1) q)`` among ``n``
unseen normal images", which flags a new normal image with probability at most ``1 - q`` (split conformal; see
:mod:`anomalib_adfa.evaluation.conformal` for what each validation protocol guarantees). Everything that applies
anomalib's post-processor inherits it: ``anomalib test``/``predict``, :class:`~anomalib_adfa.callbacks.ScoreCSVWriter`
and the ONNX/OpenVINO exports (anomalib bakes the post-processor's buffers into the exported graph). Its threshold
is that score moved into the gap above it (``gap_side = "above"``), which labels every validation image as the score
itself does.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from anomalib.data import Batch
from anomalib.metrics import AnomalibMetric
from anomalib.metrics.threshold import Threshold
from anomalib.post_processing import PostProcessor
from torchmetrics.aggregation import CatMetric
from torchmetrics.utilities.data import dim_zero_cat

from anomalib_adfa.evaluation.conformal import check_specificity, conformal_rank, min_calibration_normals

logger = logging.getLogger(__name__)

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
        # A torchmetrics state, so that under DDP every rank moves the threshold with the scores of all ranks,
        # as the threshold itself was fitted.
        self._validation_scores = CatMetric()

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Batch, *args: Any, **kwargs: Any) -> None:
        """Fit as anomalib does, and keep the raw image scores for :meth:`threshold_in_gap`."""
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
        if self.enable_thresholding and outputs.pred_score is not None:
            self._validation_scores.update(outputs.pred_score.detach().flatten())

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Fit the thresholds and the normalisation as anomalib does, then move the image threshold into its gap."""
        super().on_validation_epoch_end(trainer, pl_module)
        if self._validation_scores.update_called:
            scores = self._validation_scores.compute().flatten()
            self._validation_scores.reset()
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


def normal_quantile_threshold(normal_scores: torch.Tensor, target_specificity: float) -> torch.Tensor:
    """Return the split-conformal threshold: the normal score of rank ``k = ceil((n + 1) q)``.

    With ``n`` normal scores sorted as ``s_(1) <= ... <= s_(n)``, ``t = s_(k)`` for ``k`` =
    :func:`.conformal_rank` (clipped to ``n``). A score is abnormal when it is strictly
    greater than ``t`` (anomalib's ``pred > threshold``), so a score equal to ``t`` is normal; a new normal image
    exchangeable with these is then flagged with probability at most ``1 - k / (n + 1) <= 1 - q`` (see
    :mod:`.conformal`). The specificity on these scores themselves is ``#{s_i <= t} / n >= k / n``.
    (Before issue 21 this rule took ``k = ceil(q n)``, the lower empirical quantile, which flags a new normal image
    with probability up to ``1 - q + 1 / (n + 1)``.)

    Args:
        normal_scores: Scores of normal images (or pixels), any shape.
        target_specificity: ``q`` in (0, 1).

    Returns:
        The threshold, a 0-d tensor of ``normal_scores``' dtype.
    """
    flat = normal_scores.flatten()
    return torch.kthvalue(flat.cpu(), conformal_rank(flat.numel(), target_specificity)).values.to(normal_scores.device)


class _NormalQuantileThreshold(Threshold):
    """Threshold at a target specificity on the normal images of the validation set.

    ``update(preds, labels)`` keeps ``preds`` of images with ``labels == 0``: image scores ``(B,)`` for the
    image threshold, or anomaly maps ``(B, 1, H, W)`` for the pixel threshold (every pixel of a normal image
    counts as a normal pixel). ``compute`` applies :func:`normal_quantile_threshold`.

    Args:
        target_specificity: Fraction of validation normals (images or pixels) to keep below the threshold.
        unit: ``"image"`` or ``"pixel"``, used in messages.
    """

    full_state_update = False

    def __init__(self, target_specificity: float = 0.95, unit: str = "image", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target_specificity = check_specificity(target_specificity)
        self.unit = unit
        self.add_state("normal_preds", default=[], dist_reduce_fx="cat")
        self.add_state("seen", default=torch.tensor(0), dist_reduce_fx="sum")
        self.normal_preds: list[torch.Tensor]
        self.seen: torch.Tensor
        self.num_normal = 0
        self.achieved_specificity = float("nan")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the predictions of the normal images of a batch.

        Args:
            preds: ``(B,)`` scores or ``(B, ...)`` anomaly maps.
            labels: ``(B,)`` image labels, 0 for normal.
        """
        normal = labels.reshape(-1) == 0
        self.seen += labels.numel()
        self.normal_preds.append(preds.reshape(labels.numel(), -1)[normal].detach().flatten())

    def compute(self) -> torch.Tensor:
        """Compute the threshold; warn when the validation normals are too few to resolve the target specificity.

        Raises:
            ValueError: When the validation set had no normal image.
        """
        # A list while collecting; one tensor once torchmetrics has gathered it across DDP ranks.
        preds = self.normal_preds
        scores = dim_zero_cat(preds) if isinstance(preds, torch.Tensor) or preds else torch.empty(0)
        if scores.numel() == 0:
            msg = (
                f"cannot set the {self.unit} threshold at specificity {self.target_specificity}: the validation set "
                f"({int(self.seen)} images) has no normal image. Use a validation protocol that holds out normal "
                "images (val_split_mode=from_train or synthetic)"
            )
            raise ValueError(msg)
        needed = min_calibration_normals(self.target_specificity)
        if self.unit == "image" and scores.numel() < needed:
            images = scores.numel()
            logger.warning(
                "Only %d normal images behind the image threshold: the conformal rank ceil((n+1) q) exceeds n for "
                "target specificity %s, so the threshold is the largest normal score and a new normal image is "
                "flagged with probability up to 1/(n+1) = %.3f instead of %.3f; the target needs at least %d normal "
                "images (n >= 1/(1-q) - 1)",
                images,
                self.target_specificity,
                1 / (images + 1),
                1 - self.target_specificity,
                needed,
            )
        threshold = normal_quantile_threshold(scores, self.target_specificity)
        self.num_normal = int(scores.numel())
        self.achieved_specificity = float((scores <= threshold).double().mean())
        return threshold


class NormalQuantileThreshold(AnomalibMetric, _NormalQuantileThreshold):  # type: ignore[misc]
    """:class:`_NormalQuantileThreshold` reading its inputs from anomalib batches (``fields`` = preds, labels)."""


_CALIBRATION_SOURCES = {
    "from_train": "held-out training normals (from_train)",
    "synthetic": "held-out training normals (synthetic)",
    "same_as_test": "test normals (same_as_test: test-calibrated)",
    "from_test": "test normals (from_test: test-calibrated)",
}
"""Where the normals behind a threshold come from, by the datamodule's ``val_split_mode``."""


class SpecificityPostProcessor(RankPreservingPostProcessor):
    """Operating points fixed on validation normals: thresholds at a target specificity, rank-preserving scores.

    Fitting (on each validation epoch):

    - image threshold (``image_threshold``, raw score scale): :func:`normal_quantile_threshold` ``t`` of the
      ``pred_score`` of the validation images with ``gt_label == 0``, then moved to the midpoint between ``t``
      and the next higher validation score (:meth:`RankPreservingPostProcessor.threshold_in_gap`, side
      ``"above"``): every validation image keeps the label ``score > t`` gives it, and an exported model's
      last-bit differences cannot flip an image sitting on the threshold;
    - pixel threshold (``pixel_threshold``, raw anomaly-map scale): the same rank rule over every pixel of
      the ``anomaly_map`` of those normal images. No mask is used, so it is label-free too;
    - normalisation range (``image_min``/``image_max``, ``pixel_min``/``pixel_max``): anomalib's, over all
      validation images (including synthetic anomalies).

    Output: normalised scores ``sigmoid(4 (s - t) / (max - min))`` (0.5 at the threshold, same ranking as
    the raw scores), ``pred_label = pred_score > 0.5`` (i.e. raw score ``> image_threshold``) and
    ``pred_mask = anomaly_map > 0.5`` (raw map ``> pixel_threshold``). A score equal to the chosen
    normal score is normal. ``normalized_image_threshold``/``normalized_pixel_threshold`` are 0.5 (anomalib's
    ``1 - sensitivity``; leave ``image_sensitivity``/``pixel_sensitivity`` at 0.5 to keep the target).
    After fitting, ``image_threshold_stats``/``pixel_threshold_stats`` hold the number of normal
    validation images (or pixels) ``n``, the specificity achieved on them (``>= k / n``) and where they came from;
    they are saved in checkpoints, for the operating-point summary of ``anomalib test``.

    Validation sets with abnormal images (``synthetic``, or ``same_as_test``): the thresholds still come
    from the normal images alone, so they do not depend on which or how many anomalies are present; under
    ``same_as_test`` the normal images are test images and the operating point is test-calibrated.

    Args:
        target_specificity: Fraction of validation normals to keep below the thresholds, in (0, 1).
        **kwargs: anomalib :class:`~anomalib.post_processing.PostProcessor` options.

    Raises:
        ValueError: For a ``target_specificity`` outside (0, 1); at fitting, when the validation set has no
            normal image. Too few normals for the target (``n (1 - q) < 1``, e.g. 0.99 with 12) log a
            warning naming the achievable resolution ``1/n``.

    Example:
        >>> from anomalib.models import Padim
        >>> model = Padim(post_processor=SpecificityPostProcessor(target_specificity=0.9))

        From the CLI: ``--model.post_processor anomalib_adfa.SpecificityPostProcessor
        --model.post_processor.target_specificity 0.9``.
    """

    gap_side = "above"  # a score equal to the quantile is normal

    def __init__(self, target_specificity: float = 0.95, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target_specificity = check_specificity(target_specificity)
        self._image_threshold_metric = NormalQuantileThreshold(
            target_specificity=self.target_specificity, unit="image", fields=["pred_score", "gt_label"], strict=False
        )
        self._pixel_threshold_metric = NormalQuantileThreshold(
            target_specificity=self.target_specificity, unit="pixel", fields=["anomaly_map", "gt_label"], strict=False
        )
        self.image_threshold_stats: dict[str, float] = {}
        self.pixel_threshold_stats: dict[str, float] = {}

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        stats = ("image_threshold_stats", "pixel_threshold_stats")
        return (*super()._checkpoint_config_keys, "target_specificity", *stats)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Fit the thresholds and the normalisation, and keep the thresholds' validation statistics."""
        image_metric, pixel_metric = self._image_threshold_metric, self._pixel_threshold_metric
        image_metric.target_specificity = pixel_metric.target_specificity = check_specificity(self.target_specificity)
        fit_image, fit_pixel = image_metric.update_called, pixel_metric.update_called
        super().on_validation_epoch_end(trainer, pl_module)
        mode = getattr(getattr(trainer, "datamodule", None), "val_split_mode", None)
        mode = getattr(mode, "value", mode)
        calibration = _CALIBRATION_SOURCES.get(mode, "validation normals" + (f" ({mode})" if mode else ""))
        for fitted, metric, name in ((fit_image, image_metric, "image"), (fit_pixel, pixel_metric, "pixel")):
            if fitted and self.enable_thresholding:
                stats = {
                    "normal_count": metric.num_normal,
                    "val_specificity": metric.achieved_specificity,
                    "calibration": calibration,
                }
                setattr(self, f"{name}_threshold_stats", stats)
