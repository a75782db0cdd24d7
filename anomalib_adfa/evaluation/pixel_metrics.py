"""Pixel-level (localisation) metrics from anomaly maps and lesion masks, with bootstrap CIs over images.

Three metrics, all computed from raw anomaly maps of shape ``(N, H, W)`` and binary masks of the same shape:

- **pixel AUROC**: every pixel of every test image is one sample (exact: :func:`.exact_auroc`).
- **AUPRO** (anomalib's :class:`~anomalib.metrics.AUPRO`, FPR limit :data:`FPR_LIMIT` = 0.3): each connected
  lesion region weighs the same whatever its size; the area under the per-region-overlap vs false-positive-rate
  curve up to FPR 0.3, divided by 0.3.
- **Dice / IoU** of the map thresholded at one pixel threshold, pooled over all pixels of all test images
  (``Dice = 2 TP / (2 TP + FP + FN)``, ``IoU = TP / (TP + FP + FN)``). Pooled Dice is the pixel F1 score, so
  anomalib's pixel threshold (:class:`~anomalib.metrics.F1AdaptiveThreshold` on the validation maps) is the
  threshold maximising Dice on validation; ADFA's default post-processor instead puts it at a target
  specificity on the validation normals' pixels (label-free). :func:`threshold_label` says which.

Confidence intervals resample the test *images* with replacement (pixels of one image are not independent).
Each replicate's AUROC and AUPRO are computed from per-image histograms over :data:`CI_BINS` score bins (edges
at quantiles of all map values), which makes 1000 replicates cost a few matrix products; Dice and IoU replicates
are exact. The point estimates are always the exact values.

Derivation of the binned replicate (image ``i`` drawn ``w_i`` times, bins ``b`` in increasing score):
``P_b = sum_i w_i pos_ib``, ``N_b = sum_i w_i neg_ib``; ``AUROC = sum_b P_b (N_<b + N_b / 2) / (P N)`` (ties
within a bin count one half), which is the exact AUROC of the bin indices. The bootstrap weights ``w_i`` are why
this is not torchmetrics' binned AUROC (``binary_auroc(..., thresholds=...)`` takes no sample weights);
``tests/test_pixel_metrics.py`` checks that with unit weights both agree. For PRO,
``S_i(t) = sum over regions r of image i of |r above t| / |r|``, so
``PRO(t) = sum_i w_i S_i(t) / sum_i w_i R_i`` with ``R_i`` regions in image ``i``, and
``FPR(t) = sum_i w_i FP_i(t) / sum_i w_i BG_i``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from anomalib.metrics import AUPRO, AUROC, F1Score
from anomalib.metrics.aupro import _AUPRO
from anomalib.metrics.base import AnomalibMetric
from anomalib.utils.cv import connected_components_cpu
from lightning.pytorch import LightningModule, Trainer
from torchmetrics.classification import BinaryJaccardIndex

from anomalib_adfa.evaluation.metrics import exact_auroc
from anomalib_adfa.evaluation.operating_point import OperatingPointEvaluator

logger = logging.getLogger(__name__)

FPR_LIMIT = 0.3
"""False-positive-rate limit of AUPRO (anomalib's default, the MVTec AD convention)."""

CI_BINS = 1024
"""Score bins of the bootstrap replicates of pixel AUROC and AUPRO."""

CI_SAMPLES = 1000
"""Bootstrap replicates."""


class MaskMismatchError(ValueError):
    """An anomaly map and its mask cannot be compared (different sizes, or a non-binary mask)."""


class IoU(AnomalibMetric, BinaryJaccardIndex):  # type: ignore[misc]
    """torchmetrics' Jaccard index (IoU) for anomalib batches."""


def pixel_test_metrics() -> list[AnomalibMetric]:
    """Pixel metrics for anomalib's :class:`~anomalib.metrics.Evaluator`; skipped for batches without masks.

    Returns:
        ``pixel_AUROC``, ``pixel_AUPRO@fpr0.3``, ``pixel_Dice`` and ``pixel_IoU``. Dice and IoU compare the
        post-processor's ``pred_mask`` with ``gt_mask``; :class:`LocalisationEvaluator` appends where the
        pixel threshold came from to their names.
    """
    aupro_metric = AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=FPR_LIMIT)
    aupro_metric.name = f"pixel_AUPRO@fpr{FPR_LIMIT}"
    dice = F1Score(fields=["pred_mask", "gt_mask"], strict=False)
    dice.name = "pixel_Dice"
    iou = IoU(fields=["pred_mask", "gt_mask"], strict=False)
    iou.name = "pixel_IoU"
    return [AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False), aupro_metric, dice, iou]


class LocalisationEvaluator(OperatingPointEvaluator):
    """Evaluator that leads with the operating point and names the pixel threshold's source in ``pixel_Dice``/``IoU``.

    At setup it renames them ``pixel_Dice@<label>`` and ``pixel_IoU@<label>`` with
    :func:`threshold_label` of the model's post-processor and the datamodule's validation mode.
    """

    _THRESHOLDED = ("pixel_Dice", "pixel_IoU")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Rename the thresholded metrics, then set up as anomalib does."""
        datamodule = getattr(trainer, "datamodule", None)
        post_processor = getattr(pl_module, "post_processor", None)
        label = threshold_label(post_processor, getattr(datamodule, "val_split_mode", None))
        for metric in [*self.val_metrics, *self.test_metrics]:
            base = metric.name.split("@", 1)[0]
            if base in self._THRESHOLDED:
                metric.name = f"{base}@{label}"
        super().setup(trainer, pl_module, stage)


def threshold_label(post_processor: Any, val_split_mode: Any, level: str = "pixel") -> str:
    """Say where a post-processor's pixel (or image) threshold comes from.

    - A post-processor may state it with a ``pixel_threshold_label`` (``image_threshold_label``) attribute.
    - One with a ``target_specificity`` (:class:`.SpecificityPostProcessor`) puts
      the threshold at that specificity on the validation normals, without masks: ``val_spec95`` for 0.95.
    - Otherwise anomalib's F1-adaptive threshold maximises the F1 score on the validation set, which for pixels
      is the pooled Dice: ``val_max_dice`` (``val_max_f1``). A ``from_train`` validation set has no anomalies
      to maximise it on, and anomalib then takes the highest validation value: ``val_normal_max``.

    The prefix is ``test_`` instead of ``val_`` when the validation set is the test set (``same_as_test``):
    the threshold was then chosen on test data; ``oof_`` under ``crossfit`` (out-of-fold training normals).

    Args:
        post_processor: The model's post-processor (or ``None``).
        val_split_mode: The datamodule's ``val_split_mode`` (enum or string), ``None`` when unknown.
        level: ``"pixel"`` or ``"image"``.

    Returns:
        The label.
    """
    own = getattr(post_processor, f"{level}_threshold_label", None)
    if own:
        return str(own)
    mode = getattr(val_split_mode, "value", val_split_mode)
    split = {"same_as_test": "test", "crossfit": "oof"}.get(mode, "val")
    specificity = getattr(post_processor, "target_specificity", None)
    if specificity is not None:
        return f"{split}_spec{round(100 * float(specificity)):d}"
    if mode == "from_train":
        return "val_normal_max"
    return f"{split}_max_{'dice' if level == 'pixel' else 'f1'}"


def check_maps_and_masks(
    maps: torch.Tensor, masks: torch.Tensor, paths: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring maps and masks to ``(N, H, W)`` and refuse pairs that cannot be compared.

    Args:
        maps: Anomaly maps, shape ``(N, H, W)`` or ``(N, 1, H, W)``.
        masks: Masks, shape ``(N, H, W)`` or ``(N, 1, H, W)``, values 0/1 (or bool).
        paths: Image path of each map, named in errors.

    Returns:
        ``maps`` as float64 and ``masks`` as bool, both ``(N, H, W)``.

    Raises:
        MaskMismatchError: Naming the image when a mask's size differs from its map's or a mask is not binary.
    """
    maps = maps.reshape(maps.shape[0], *maps.shape[-2:]) if maps.dim() == 4 else maps
    masks = masks.reshape(masks.shape[0], *masks.shape[-2:]) if masks.dim() == 4 else masks
    name = (lambda index: paths[index]) if paths is not None else (lambda index: f"image #{index}")
    if maps.dim() != 3 or masks.dim() != 3 or maps.shape[0] != masks.shape[0]:
        msg = f"anomaly maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (N, H, W)"
        raise MaskMismatchError(msg)
    if maps.shape != masks.shape:
        msg = (
            f"the mask of {name(0)} is {masks.shape[-1]}x{masks.shape[-2]} pixels but its anomaly map is "
            f"{maps.shape[-1]}x{maps.shape[-2]}: masks must have their image's size"
        )
        raise MaskMismatchError(msg)
    if masks.dtype != torch.bool:
        not_binary = ((masks != 0) & (masks != 1)).flatten(1).any(dim=1)
        if not_binary.any():
            index = int(not_binary.nonzero()[0])
            msg = f"the mask of {name(index)} is not binary: values {masks[index].unique()[:5].tolist()}"
            raise MaskMismatchError(msg)
    return maps.double(), masks.bool()


def aupro(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = FPR_LIMIT) -> float:
    """AUPRO (anomalib's) up to ``fpr_limit``, normalised by it.

    Args:
        maps: Raw anomaly maps ``(N, H, W)``.
        masks: Binary masks ``(N, H, W)``.
        fpr_limit: False-positive-rate limit.

    Returns:
        The AUPRO.
    """
    maps, masks = check_maps_and_masks(maps, masks)
    metric = _AUPRO(fpr_limit=fpr_limit)  # the tensor-level metric behind anomalib's batch-level AUPRO
    metric.update(maps.float(), masks.int())
    return float(metric.compute())


def dice_iou(predicted: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """Pooled Dice and IoU of binary predictions (``nan`` when neither has a positive pixel).

    Args:
        predicted: Predicted lesion pixels ``(N, H, W)`` (bool or 0/1).
        masks: Binary masks ``(N, H, W)``.

    Returns:
        ``(dice, iou)``.
    """
    counts = _overlap_counts(predicted.bool(), masks.bool()).sum(axis=0)
    return _dice_iou_from_counts(counts)


class PixelResult(NamedTuple):
    """Pixel metrics of one test set with 95% bootstrap CIs over images (``(low, high)``)."""

    auroc: float
    auroc_ci: tuple[float, float]
    aupro: float
    aupro_ci: tuple[float, float]
    dice: float
    dice_ci: tuple[float, float]
    iou: float
    iou_ci: tuple[float, float]
    threshold: float
    n_images: int

    def as_dict(self, threshold_label: str) -> dict[str, float | int | str]:
        """Flat columns: ``pixel_AUROC``, ``pixel_AUROC_ci_low``, ..., ``pixel_Dice``, ``pixel_threshold_source``."""
        row: dict[str, float | int | str] = {}
        for name, value, interval in (
            ("pixel_AUROC", self.auroc, self.auroc_ci),
            ("pixel_AUPRO", self.aupro, self.aupro_ci),
            ("pixel_Dice", self.dice, self.dice_ci),
            ("pixel_IoU", self.iou, self.iou_ci),
        ):
            row[name] = value
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = interval
        row["pixel_threshold"] = self.threshold
        row["pixel_threshold_source"] = threshold_label
        row["pixel_n_images"] = self.n_images
        return row


def pixel_metrics(
    maps: torch.Tensor,
    masks: torch.Tensor,
    threshold: float,
    paths: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    num_samples: int = CI_SAMPLES,
    seed: int = 0,
) -> PixelResult:
    """All pixel metrics of a test set with 95% bootstrap confidence intervals over images.

    Args:
        maps: Raw anomaly maps ``(N, H, W)`` (or ``(N, 1, H, W)``).
        masks: Binary masks of the same shape.
        threshold: Raw pixel threshold of Dice/IoU (pixels with map > threshold are predicted lesion, as in
            anomalib's post-processor).
        paths: Image paths, named in errors and warnings.
        labels: Image labels (1 = abnormal); abnormal images whose mask is empty at this resolution (the lesion
            lies outside the compared region, e.g. cut off by a centre crop) are reported in a warning.
        num_samples: Bootstrap replicates.
        seed: Seed of the resampling.

    Returns:
        The metrics.
    """
    maps, masks = check_maps_and_masks(maps, masks, paths)
    if labels is not None:
        empty = [index for index, label in enumerate(labels) if int(label) == 1 and not masks[index].any()]
        if empty:
            names = ", ".join(paths[i] if paths is not None else f"#{i}" for i in empty[:5])
            logger.warning(
                "%d abnormal image(s) have no lesion pixel in the compared region (%s); their pixels count as normal",
                len(empty),
                names,
            )
    if not masks.any() or masks.all():
        msg = "pixel metrics need both lesion and normal pixels in the masks"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, maps.shape[0], (num_samples, maps.shape[0]))
    weights = np.stack([np.bincount(draw, minlength=maps.shape[0]) for draw in draws]).astype(np.float64)
    histograms = _binned(maps, masks)
    counts = _overlap_counts(maps > threshold, masks)
    dice, iou = _dice_iou_from_counts(counts.sum(axis=0))
    dice_reps, iou_reps = zip(*(_dice_iou_from_counts(row) for row in weights @ counts), strict=True)
    return PixelResult(
        auroc=exact_auroc(maps, masks),
        auroc_ci=_interval(_binned_auroc(weights, histograms)),
        aupro=aupro(maps, masks),
        aupro_ci=_interval(_binned_aupro(weights, histograms)),
        dice=dice,
        dice_ci=_interval(np.asarray(dice_reps)),
        iou=iou,
        iou_ci=_interval(np.asarray(iou_reps)),
        threshold=float(threshold),
        n_images=int(maps.shape[0]),
    )


class _Histograms(NamedTuple):
    positive: np.ndarray  # (N, B) lesion pixels per image and bin
    negative: np.ndarray  # (N, B) normal pixels per image and bin
    overlap: np.ndarray  # (N, B) sum over the image's regions of (region pixels in the bin) / (region size)
    regions: np.ndarray  # (N,) lesion regions per image


def _binned(maps: torch.Tensor, masks: torch.Tensor) -> _Histograms:
    values = maps.flatten().numpy()
    sample = values[np.random.default_rng(0).integers(0, values.size, min(values.size, 1_000_000))]
    edges = np.unique(np.quantile(sample, np.linspace(0, 1, CI_BINS + 1)[1:-1]))
    bins = np.searchsorted(edges, maps.numpy(), side="right").reshape(maps.shape[0], -1)
    n_bins = edges.size + 1
    regions = connected_components_cpu(masks[:, None].float()).reshape(maps.shape[0], -1).numpy()
    sizes = np.bincount(regions.ravel())
    positive = np.zeros((maps.shape[0], n_bins))
    negative = np.zeros((maps.shape[0], n_bins))
    overlap = np.zeros((maps.shape[0], n_bins))
    region_counts = np.zeros(maps.shape[0])
    flat_masks = masks.reshape(maps.shape[0], -1).numpy()
    for index in range(maps.shape[0]):
        lesion = flat_masks[index]
        positive[index] = np.bincount(bins[index][lesion], minlength=n_bins)
        negative[index] = np.bincount(bins[index][~lesion], minlength=n_bins)
        labels = regions[index][lesion]
        overlap[index] = np.bincount(bins[index][lesion], weights=1.0 / sizes[labels], minlength=n_bins)
        region_counts[index] = np.unique(labels).size
    return _Histograms(positive, negative, overlap, region_counts)


def _binned_auroc(weights: np.ndarray, histograms: _Histograms) -> np.ndarray:
    positive = weights @ histograms.positive
    negative = weights @ histograms.negative
    below = np.cumsum(negative, axis=1) - negative
    area = (positive * (below + 0.5 * negative)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return area / (positive.sum(axis=1) * negative.sum(axis=1))


def _binned_aupro(weights: np.ndarray, histograms: _Histograms, fpr_limit: float = FPR_LIMIT) -> np.ndarray:
    # Thresholds from the highest bin down: cumulative counts from the right.
    false_positives = np.cumsum((weights @ histograms.negative)[:, ::-1], axis=1)
    overlaps = np.cumsum((weights @ histograms.overlap)[:, ::-1], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = false_positives / false_positives[:, -1:]
        pro = overlaps / (weights @ histograms.regions)[:, None]
    values = np.empty(weights.shape[0])
    for row in range(weights.shape[0]):
        x = np.concatenate([[0.0], fpr[row]])
        y = np.concatenate([[0.0], pro[row]])
        keep = x <= fpr_limit
        cut = int(keep.sum())
        y_limit = np.interp(fpr_limit, x, y) if cut < x.size else y[-1]
        xs = np.concatenate([x[:cut], [fpr_limit]])
        ys = np.concatenate([y[:cut], [y_limit]])
        values[row] = np.trapezoid(ys, xs) / fpr_limit
    return values


def _overlap_counts(predicted: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Per image ``(TP, FP, FN)`` pixel counts, shape ``(N, 3)``."""
    predicted = predicted.reshape(predicted.shape[0], -1)
    masks = masks.reshape(masks.shape[0], -1)
    tp = (predicted & masks).sum(dim=1)
    fp = (predicted & ~masks).sum(dim=1)
    fn = (~predicted & masks).sum(dim=1)
    return torch.stack([tp, fp, fn], dim=1).double().numpy()


def _dice_iou_from_counts(counts: np.ndarray) -> tuple[float, float]:
    tp, fp, fn = (float(value) for value in counts)
    if tp + fp + fn == 0:
        return float("nan"), float("nan")
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def _interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)
