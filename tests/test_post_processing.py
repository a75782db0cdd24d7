"""RankPreservingPostProcessor: thresholds moved into the gap next to the fitted validation score."""

import pytest
import torch
from anomalib.data import ImageBatch

from anomalib_adfa.post_processing import RankPreservingPostProcessor

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
