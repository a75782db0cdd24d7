"""Pixel metrics: hand-made cases with known values, scikit-learn on real and phantom masks, and ``anomalib test``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from anomalib.post_processing import PostProcessor
from scipy import ndimage
from sklearn.metrics import f1_score, jaccard_score, roc_auc_score

from anomalib_adfa.callbacks import REPORT_DATA_DIR
from anomalib_adfa.data import BUSIDataset, load_image
from anomalib_adfa.evaluation.metrics import exact_auroc
from anomalib_adfa.evaluation.pixel_metrics import (
    MaskMismatchError,
    _binned,
    _binned_auroc,
    aupro,
    check_maps_and_masks,
    dice_iou,
    pixel_metrics,
    threshold_label,
)
from anomalib_adfa.evaluation.post_processing import SpecificityPostProcessor
from anomalib_adfa.synthetic import make_phantom_dataset


def two_region_case() -> tuple[torch.Tensor, torch.Tensor]:
    """One 9x12 image: two 4-pixel lesions and 100 normal pixels, with a PRO curve known by hand.

    Lesion A scores 3 everywhere; lesion B scores 3 on two pixels and 1 on two; ten normal pixels score 2, the
    other 90 score 0. Going down the thresholds: above 2, FPR 0 and PRO (1 + 1/2) / 2 = 0.75; down to 2, FPR
    0.1 at PRO 0.75; down to 1, PRO 1 at FPR 0.1. So PRO = 0.75 on [0, 0.1) and 1 on [0.1, 0.3]:
    AUPRO(0.3) = (0.1 * 0.75 + 0.2 * 1) / 0.3 = 0.91667.
    """
    maps = torch.zeros(1, 9, 12)
    masks = torch.zeros(1, 9, 12, dtype=torch.uint8)
    masks[0, 0:2, 0:2] = 1
    masks[0, 6:8, 8:10] = 1
    maps[0, 0:2, 0:2] = 3
    maps[0, 6, 8:10] = 3
    maps[0, 7, 8:10] = 1
    maps[0, 4, 0:10] = 2
    return maps, masks


def test_aupro_of_a_hand_made_case() -> None:
    maps, masks = two_region_case()
    assert aupro(maps, masks) == pytest.approx((0.1 * 0.75 + 0.2 * 1.0) / 0.3, abs=1e-6)


def test_dice_and_iou_of_a_hand_made_case() -> None:
    predicted = torch.tensor([[[1, 1, 1, 1, 1, 1, 0, 0]]]).bool()
    mask = torch.tensor([[[0, 0, 0, 1, 1, 1, 1, 0]]])
    # 3 true positives, 3 false positives, 1 false negative.
    assert dice_iou(predicted, mask) == pytest.approx((2 * 3 / (2 * 3 + 3 + 1), 3 / (3 + 3 + 1)))


def test_bootstrap_of_identical_images_has_no_spread_and_matches_the_exact_values() -> None:
    """Resampling copies of one image changes nothing, so each binned replicate must equal the exact value."""
    maps, masks = two_region_case()
    result = pixel_metrics(maps.repeat(3, 1, 1), masks.repeat(3, 1, 1), threshold=2.5, num_samples=50)
    assert result.aupro_ci == pytest.approx((result.aupro, result.aupro), abs=1e-6)
    assert result.auroc_ci == pytest.approx((result.auroc, result.auroc), abs=1e-6)
    # Above 2.5: lesion A and half of B, no normal pixel: Dice 2 * 6 / (2 * 6 + 2) per image.
    assert result.dice == pytest.approx(12 / 14)
    assert result.dice_ci == pytest.approx((12 / 14, 12 / 14))


def test_pixel_auroc_keeps_the_order_of_large_raw_scores() -> None:
    """torchmetrics' sigmoid would tie raw scores in the hundreds; the AUROC must be scikit-learn's."""
    rng = np.random.default_rng(0)
    masks = torch.zeros(6, 16, 16, dtype=torch.uint8)
    masks[:3, 4:9, 3:10] = 1
    maps = 300 + 20 * torch.from_numpy(rng.normal(size=(6, 16, 16))) + 15 * masks
    expected = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert exact_auroc(maps, masks) == pytest.approx(expected, abs=1e-6)


def test_binned_bootstrap_auroc_with_unit_weights_is_the_exact_auroc_when_each_value_has_its_bin() -> None:
    """Maps of ten distinct values: each gets its own bin, so the binned replicate must equal torchmetrics' AUROC."""
    rng = np.random.default_rng(1)
    masks = torch.zeros(5, 12, 12, dtype=torch.bool)
    masks[:3, 3:8, 2:9] = True
    maps = torch.from_numpy(rng.integers(0, 8, size=(5, 12, 12)) + 2 * masks.numpy()).double()
    (binned,) = _binned_auroc(np.ones((1, 5)), _binned(maps, masks))
    assert binned == pytest.approx(exact_auroc(maps, masks), abs=1e-6)


def _independent_checks(maps: torch.Tensor, masks: torch.Tensor, threshold: float) -> None:
    """Check pixel AUROC, Dice and IoU against scikit-learn, and the CIs against the values."""
    result = pixel_metrics(maps, masks, threshold, num_samples=200)
    truth, scores = masks.flatten().numpy().astype(int), maps.flatten().numpy()
    assert result.auroc == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)
    assert result.dice == pytest.approx(f1_score(truth, scores > threshold), abs=1e-9)
    assert result.iou == pytest.approx(jaccard_score(truth, scores > threshold), abs=1e-9)
    for value, (low, high) in ((result.auroc, result.auroc_ci), (result.aupro, result.aupro_ci)):
        assert low - 0.01 <= value <= high + 0.01  # binned replicates, exact point value
    assert result.dice_ci[0] <= result.dice <= result.dice_ci[1]
    assert 0.0 <= result.aupro <= 1.0


def _darkness_maps(images: list[torch.Tensor]) -> torch.Tensor:
    """A crude, model-free lesion detector for ultrasound: local darkness (lesions are hypoechoic)."""
    return torch.stack([torch.from_numpy(-ndimage.gaussian_filter(image[0].numpy(), 3.0)) for image in images])


def test_pixel_metrics_on_the_busi_sample_match_scikit_learn(busi_sample_root: Path) -> None:
    dataset = BUSIDataset(root=busi_sample_root, split="test", abnormal="all")
    items = [dataset[index] for index in range(len(dataset))]
    # One common size, as anomalib's collate does, with nearest-neighbour masks.
    size = (64, 64)
    images = [torch.nn.functional.interpolate(item.image[None], size=size, mode="bilinear")[0] for item in items]
    masks = torch.stack(
        [
            torch.nn.functional.interpolate(item.gt_mask[None, None].float(), size=size, mode="nearest")[0, 0]
            for item in items
        ]
    )
    maps = _darkness_maps(images)
    _independent_checks(maps, masks, threshold=float(maps.quantile(0.8)))


def test_pixel_metrics_on_phantoms_match_scikit_learn(tmp_path: Path) -> None:
    dataset = make_phantom_dataset(tmp_path, n_train=4, n_test_normal=2, n_test_abnormal=4, image_size=64)
    paths = sorted(dataset.abnormal_dir.glob("*.png")) + sorted(dataset.normal_test_dir.glob("*.png"))
    normal = torch.stack([load_image(path)[0] for path in sorted(dataset.normal_dir.glob("*.png"))]).mean(0)
    maps = torch.stack([(load_image(path)[0] - normal).abs() for path in paths]).double()
    masks = torch.stack(
        [
            load_image(dataset.mask_dir / path.name)[0] > 0.5 if path.parent == dataset.abnormal_dir else normal < -1
            for path in paths
        ]
    )
    _independent_checks(maps, masks, threshold=float(maps.quantile(0.9)))


def test_a_mask_of_another_size_is_refused_naming_the_image() -> None:
    with pytest.raises(MaskMismatchError, match=r"benign \(7\)\.png.*30x20 pixels but its anomaly map is 32x32"):
        check_maps_and_masks(torch.zeros(1, 32, 32), torch.zeros(1, 20, 30), paths=["benign (7).png"])


def test_a_non_binary_mask_is_refused_naming_the_image() -> None:
    masks = torch.zeros(2, 4, 4)
    masks[1, 0, 0] = 255
    with pytest.raises(MaskMismatchError, match=r"b\.png is not binary"):
        check_maps_and_masks(torch.zeros(2, 4, 4), masks, paths=["a.png", "b.png"])


def test_an_abnormal_image_with_an_empty_mask_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    maps, masks = two_region_case()
    maps, masks = torch.cat([maps, maps]), torch.cat([masks, torch.zeros_like(masks)])
    with caplog.at_level(logging.WARNING):
        pixel_metrics(maps, masks, 2.5, paths=["a.png", "cut.png"], labels=[1, 1], num_samples=10)
    assert "1 abnormal image(s) have no lesion pixel" in caplog.text
    assert "cut.png" in caplog.text


def test_threshold_labels_name_their_source() -> None:
    assert threshold_label(PostProcessor(), "same_as_test") == "test_max_dice"
    assert threshold_label(PostProcessor(), "synthetic") == "val_max_dice"
    assert threshold_label(PostProcessor(), "synthetic", level="image") == "val_max_f1"
    assert threshold_label(PostProcessor(), "from_train") == "val_normal_max"
    assert threshold_label(SpecificityPostProcessor(target_specificity=0.9), "from_train") == "val_spec90"
    assert threshold_label(SpecificityPostProcessor(), "same_as_test", level="image") == "test_spec95"

    class LabelFree(PostProcessor):
        pixel_threshold_label = "val_specificity_0.95"

    assert threshold_label(LabelFree(), "from_train") == "val_specificity_0.95"


def test_anomalib_test_prints_the_pixel_metrics(localisation_runs: dict[str, Path]) -> None:
    """ADFA's default evaluator logs them; its pixel AUROC is the raw maps' (scikit-learn, at the model input)."""
    # The phantom Folder validates on the test set; BUSI holds out training normals (label-free, the default).
    sources = {"phantom": "test_spec95", "busi_sample": "val_spec95"}
    for name, run in localisation_runs.items():
        metrics = json.loads((run / "metrics.json").read_text())
        source = sources[name]
        dice, iou = f"pixel_Dice@{source}", f"pixel_IoU@{source}"
        assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO@fpr0.3", dice, iou} <= set(metrics), (name, metrics)
        assert "pixel_F1Score" not in metrics  # it is pixel_Dice, under its name
        saved = json.loads((run / REPORT_DATA_DIR / "run.json").read_text())
        assert saved["mask_resolution"] == "input"
        assert saved["pixel_threshold_source"] == source
        raw = torch.load(run / "raw_maps.pt")
        truth, scores = raw["masks"].flatten().numpy().astype(int), raw["maps"].flatten().numpy()
        assert metrics["pixel_AUROC"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-3), name
        predicted = scores > saved["pixel_threshold"]
        assert metrics[dice] == pytest.approx(f1_score(truth, predicted), abs=1e-3), name
        assert metrics[iou] == pytest.approx(jaccard_score(truth, predicted), abs=1e-3), name
        assert 0.0 <= metrics["pixel_AUPRO@fpr0.3"] <= 1.0
    predictions = pd.read_csv(localisation_runs["phantom"] / REPORT_DATA_DIR / "predictions.csv")
    assert set(predictions.gt_label) == {0, 1}


def test_pixel_metrics_are_left_out_without_masks() -> None:
    from types import SimpleNamespace

    from anomalib.data import ImageBatch

    from anomalib_adfa import Adfa

    evaluator = Adfa.configure_evaluator()
    labels = torch.tensor([0, 1, 0, 1])
    batch = ImageBatch(
        image=torch.rand(4, 3, 8, 8),
        gt_label=labels,
        pred_score=torch.tensor([0.1, 0.9, 0.3, 0.7]),
        pred_label=labels.bool(),
        anomaly_map=torch.rand(4, 8, 8),
    )  # no gt_mask: a test set without lesion masks
    for metric in evaluator.test_metrics:
        metric.update(batch)
    logged: list[str] = []
    evaluator.log = lambda name, metric: logged.append(name)
    evaluator.on_test_epoch_end(SimpleNamespace(barebones=False), None)
    assert "image_AUROC" in logged
    assert not [name for name in logged if name.startswith("pixel_")]
    assert {metric.name for metric in evaluator.test_metrics if metric.name.startswith("pixel_")}  # they exist
