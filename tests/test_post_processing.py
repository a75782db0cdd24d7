"""Operating points at a target specificity: the quantile rule, the post-processor, and bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch

from anomalib_adfa import SpecificityPostProcessor
from anomalib_adfa.post_processing import normal_quantile_threshold, quantile_rank


def _fit(post_processor: SpecificityPostProcessor, scores: torch.Tensor, labels: torch.Tensor, maps=None) -> None:
    """Run one validation epoch of the post-processor on the given scores (and anomaly maps)."""
    batch = ImageBatch(image=torch.zeros(len(scores), 3, 4, 4), gt_label=labels, pred_score=scores, anomaly_map=maps)
    post_processor.on_validation_batch_end(None, None, batch)
    post_processor.on_validation_epoch_end(None, None)


@pytest.mark.parametrize("count", [1, 7, 20, 100, 1000])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 0.99])
def test_threshold_is_the_lower_empirical_quantile(count: int, target: float) -> None:
    scores = torch.from_numpy(np.random.default_rng(count).normal(size=count))
    threshold = normal_quantile_threshold(scores, target)
    assert float(threshold) == np.quantile(scores.numpy(), target, method="inverted_cdf")
    # The smallest score with at least the target fraction at or below it.
    assert (scores <= threshold).double().mean() >= target or quantile_rank(count, target) == count
    below = scores[scores < threshold]
    assert below.numel() / count < target


def test_threshold_on_scores_with_known_quantiles() -> None:
    ranks = torch.arange(1, 101, dtype=torch.float64)  # 1..100: the 95 % lower quantile is 95
    assert float(normal_quantile_threshold(ranks, 0.95)) == 95.0
    assert float(normal_quantile_threshold(ranks[:20], 0.95)) == 19.0  # 0.95 * 20 = 19 exactly despite rounding
    uniform = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(normal_quantile_threshold(uniform, 0.95)) == pytest.approx(0.95, abs=0.003)
    exponential = -torch.log(uniform)
    assert float(normal_quantile_threshold(exponential, 0.9)) == pytest.approx(-np.log(0.1), abs=0.02)


def test_a_score_equal_to_the_threshold_is_normal() -> None:
    post_processor = SpecificityPostProcessor(target_specificity=0.95)
    _fit(post_processor, torch.arange(1.0, 101.0), torch.zeros(100, dtype=torch.long))
    assert float(post_processor.image_threshold) == 95.0
    out = post_processor(ImageBatch(image=torch.zeros(3, 3, 4, 4), pred_score=torch.tensor([94.0, 95.0, 96.0])))
    assert out.pred_label.tolist() == [False, False, True]
    assert post_processor.image_threshold_stats == {"normal_count": 100, "val_specificity": 0.95}


def test_threshold_comes_from_the_normals_only_and_keeps_the_ranking() -> None:
    normal = torch.arange(1.0, 21.0)
    post_processor = SpecificityPostProcessor(target_specificity=0.9)
    scores = torch.cat([normal, torch.tensor([0.5, 50.0, 500.0])])  # abnormal images, one below every normal
    _fit(post_processor, scores, torch.tensor([0] * 20 + [1] * 3))
    assert float(post_processor.image_threshold) == 18.0
    test_scores = torch.tensor([0.0, 17.9, 18.0, 18.1, 400.0, 5000.0])
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
    expected = np.quantile(maps[:3].numpy(), 0.9, method="inverted_cdf")
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
    assert "Only 12 normal validation images" in caplog.text
    assert "1/12 = 0.083" in caplog.text
    assert "at least 100" in caplog.text
    assert float(post_processor.image_threshold) == 11.0  # the largest normal
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _fit(SpecificityPostProcessor(target_specificity=0.9), torch.arange(12.0), torch.zeros(12, dtype=torch.long))
    assert "normal validation images" not in caplog.text


def test_target_specificity_is_saved_with_the_checkpoint_config() -> None:
    post_processor = SpecificityPostProcessor(target_specificity=0.9)
    restored = SpecificityPostProcessor()
    restored.load_checkpoint_config(post_processor.checkpoint_config())
    assert restored.target_specificity == 0.9
