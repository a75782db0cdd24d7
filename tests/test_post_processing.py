"""Post-processors: thresholds moved into the gap next to the fitted score; operating points at a target specificity."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.cli import AnomalibCLI
from anomalib.data import ImageBatch

from anomalib_adfa import SpecificityPostProcessor
from anomalib_adfa.evaluation.conformal import conformal_rank
from anomalib_adfa.evaluation.post_processing import RankPreservingPostProcessor, normal_quantile_threshold

gap = RankPreservingPostProcessor.threshold_in_gap
SCORES = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.5])


def test_below_labels_the_threshold_score_anomalous_as_the_f1_curve_does() -> None:
    moved = gap(torch.tensor(0.4), SCORES, "below")
    torch.testing.assert_close(moved, torch.tensor(0.3))
    assert torch.equal(moved < SCORES, SCORES >= 0.4)


def test_above_labels_the_threshold_score_normal() -> None:
    moved = gap(torch.tensor(0.4), SCORES, "above")
    torch.testing.assert_close(moved, torch.tensor(0.45))
    assert torch.equal(moved < SCORES, SCORES > 0.4)


@pytest.mark.parametrize(("threshold", "side"), [(0.1, "below"), (0.9, "above")])
def test_threshold_with_no_neighbour_stays(threshold: float, side: str) -> None:
    assert gap(torch.tensor(threshold), SCORES, side) == torch.tensor(threshold)


def test_adjacent_floats_keep_the_threshold() -> None:
    high = torch.tensor(1.0)
    low = torch.nextafter(high, torch.tensor(0.0))
    assert gap(high, torch.stack([low, high]), "below") == high


def test_validation_epoch_end_puts_the_threshold_between_scores() -> None:
    processor = RankPreservingPostProcessor()
    scores = torch.tensor([0.1, 0.2, 0.3, 0.8, 0.9, 1.0])
    batch = ImageBatch(
        image=torch.zeros(6, 3, 8, 8),
        gt_label=torch.tensor([0, 0, 0, 1, 1, 1]),
        pred_score=scores,
        anomaly_map=scores.view(6, 1, 1, 1).expand(6, 1, 8, 8).clone(),
    )
    processor.on_validation_batch_end(None, None, batch)
    processor.on_validation_epoch_end(None, None)
    # anomalib's F1 threshold is the score 0.8, which its `score > threshold` would label normal.
    threshold = processor.image_threshold
    assert not torch.isin(threshold, scores)
    assert torch.equal(scores > threshold, batch.gt_label.bool())


def _fit(post_processor: SpecificityPostProcessor, scores: torch.Tensor, labels: torch.Tensor, maps=None) -> None:
    """Run one validation epoch of the post-processor on the given scores (and anomaly maps)."""
    batch = ImageBatch(image=torch.zeros(len(scores), 3, 4, 4), gt_label=labels, pred_score=scores, anomaly_map=maps)
    post_processor.on_validation_batch_end(None, None, batch)
    post_processor.on_validation_epoch_end(None, None)


@pytest.mark.parametrize("count", [1, 7, 20, 100, 1000])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 0.99])
def test_threshold_is_the_conformal_order_statistic(count: int, target: float) -> None:
    scores = torch.from_numpy(np.random.default_rng(count).normal(size=count))
    threshold = normal_quantile_threshold(scores, target)
    rank = min(count, math.ceil(round((count + 1) * target, 9)))  # ceil((n + 1) q), clipped to n
    assert float(threshold) == np.sort(scores.numpy())[rank - 1]
    assert conformal_rank(count, target) == rank
    # At least a fraction k / n >= q n / n of the calibration scores are at or below it (all when clipped).
    assert (scores <= threshold).double().mean() >= min(1.0, target * (count + 1) / count) - 1e-12


def test_threshold_on_scores_with_known_quantiles() -> None:
    ranks = torch.arange(1, 101, dtype=torch.float64)  # 1..100: rank ceil(101 * 0.95) = ceil(95.95) = 96
    assert float(normal_quantile_threshold(ranks, 0.95)) == 96.0
    assert float(normal_quantile_threshold(ranks[:19], 0.95)) == 19.0  # 0.95 * 20 = 19 exactly despite rounding
    assert float(normal_quantile_threshold(ranks[:29], 0.95)) == 29.0  # 28.5 -> 29: the largest of 29
    uniform = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(normal_quantile_threshold(uniform, 0.95)) == pytest.approx(0.95, abs=0.003)
    exponential = -torch.log(uniform)
    assert float(normal_quantile_threshold(exponential, 0.9)) == pytest.approx(-np.log(0.1), abs=0.02)


def test_a_score_equal_to_the_threshold_is_normal() -> None:
    post_processor = SpecificityPostProcessor(target_specificity=0.95)
    _fit(post_processor, torch.arange(1.0, 101.0), torch.zeros(100, dtype=torch.long))
    # The rank-96 score is 96; the threshold sits in the gap above it, so 96 stays normal by a margin.
    assert float(post_processor.image_threshold) == 96.5
    out = post_processor(ImageBatch(image=torch.zeros(3, 3, 4, 4), pred_score=torch.tensor([95.0, 96.0, 97.0])))
    assert out.pred_label.tolist() == [False, False, True]
    stats = {"normal_count": 100, "val_specificity": 0.96, "calibration": "validation normals"}
    assert post_processor.image_threshold_stats == stats
    restored = SpecificityPostProcessor()
    restored.load_checkpoint_config(post_processor.checkpoint_config())
    assert restored.image_threshold_stats == stats  # n and its source travel with the checkpoint


def test_threshold_comes_from_the_normals_only_and_keeps_the_ranking() -> None:
    normal = torch.arange(1.0, 21.0)
    post_processor = SpecificityPostProcessor(target_specificity=0.9)
    scores = torch.cat([normal, torch.tensor([0.5, 50.0, 500.0])])  # abnormal images, one below every normal
    _fit(post_processor, scores, torch.tensor([0] * 20 + [1] * 3))
    assert float(post_processor.image_threshold) == 19.5  # rank ceil(21 * 0.9) = 19, moved into the gap below 20
    test_scores = torch.tensor([0.0, 18.9, 19.0, 19.6, 400.0, 5000.0])
    out = post_processor(ImageBatch(image=torch.zeros(6, 3, 4, 4), pred_score=test_scores.clone()))
    assert out.pred_label.tolist() == [False, False, False, True, True, True]
    assert torch.all(out.pred_score.diff() > 0)  # strictly increasing, so every AUROC is the raw one


def test_pixel_threshold_is_the_quantile_of_the_normal_images_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 1, 8, 8, generator=generator)
    maps[3:] += 10  # abnormal images' pixels must not move the threshold
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    post_processor = SpecificityPostProcessor(target_specificity=0.9)
    _fit(post_processor, maps.amax(dim=(1, 2, 3)), labels, maps)
    expected = np.sort(maps[:3].numpy().ravel())[math.ceil(193 * 0.9) - 1]  # 192 normal pixels
    assert float(post_processor.pixel_threshold) == pytest.approx(expected)
    out = post_processor(ImageBatch(image=torch.zeros(6, 3, 8, 8), pred_score=maps.amax((1, 2, 3)), anomaly_map=maps))
    assert torch.equal(out.pred_mask.reshape(maps.shape), maps > post_processor.pixel_threshold)
    assert post_processor.pixel_threshold_stats["normal_count"] == 3 * 64


@pytest.mark.parametrize("target", [0, 1, 1.5, -0.1, True, "0.9"])
def test_a_target_outside_zero_one_is_refused(target: object) -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        SpecificityPostProcessor(target_specificity=target)


def test_a_validation_set_without_normals_is_refused() -> None:
    with pytest.raises(ValueError, match=r"has no normal image.*from_train or synthetic"):
        _fit(SpecificityPostProcessor(), torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))


def test_too_few_normals_warn_with_the_achievable_resolution(caplog: pytest.LogCaptureFixture) -> None:
    post_processor = SpecificityPostProcessor(target_specificity=0.99)
    with caplog.at_level(logging.WARNING):
        _fit(post_processor, torch.arange(12.0), torch.zeros(12, dtype=torch.long))
    assert "Only 12 normal images behind the image threshold" in caplog.text
    assert "1/(n+1) = 0.077 instead of 0.010" in caplog.text
    assert "at least 99 normal images" in caplog.text
    assert float(post_processor.image_threshold) == 11.0  # the largest normal: no score above to move towards
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _fit(SpecificityPostProcessor(target_specificity=0.9), torch.arange(12.0), torch.zeros(12, dtype=torch.long))
    assert "behind the image threshold" not in caplog.text  # 12 >= 1/0.1 - 1 = 9


def test_target_specificity_is_saved_with_the_checkpoint_config() -> None:
    post_processor = SpecificityPostProcessor(target_specificity=0.9)
    restored = SpecificityPostProcessor()
    restored.load_checkpoint_config(post_processor.checkpoint_config())
    assert restored.target_specificity == 0.9


def test_target_specificity_and_label_free_protocol_are_one_flag_each_on_the_cli(tmp_path: Path) -> None:
    args = [
        *("train", "--model", "Adfa", "--model.pre_trained", "false", "--model.backbone", "tf_efficientnet_lite0"),
        *("--model.layers", "[blocks.1, blocks.2, blocks.4]"),
        *("--model.post_processor", "anomalib_adfa.SpecificityPostProcessor"),
        *("--model.post_processor.target_specificity", "0.9"),
        *("--data", "anomalib_adfa.data.BrainMRI", "--data.root", str(tmp_path), "--data.val_split_mode", "synthetic"),
        *("--trainer.callbacks+=anomalib_adfa.callbacks.LabelFreeCheckpoint", "--trainer.callbacks.quantity"),
        *("normal_score", "--default_root_dir", str(tmp_path / "run")),
    ]
    cli = AnomalibCLI(args=args, run=False)
    assert isinstance(cli.model.post_processor, SpecificityPostProcessor)
    assert cli.model.post_processor.target_specificity == 0.9
    assert cli.datamodule.val_split_mode.value == "synthetic"
