"""The operating-point summary leading ``anomalib test``: counts, Clopper-Pearson intervals, units, small-n warning."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from anomalib.data import ImageBatch

from anomalib_adfa import SpecificityPostProcessor
from anomalib_adfa.evaluation.conformal import clopper_pearson
from anomalib_adfa.evaluation.operating_point import OperatingPointEvaluator, summarise, thresholds


def _fitted(normal_scores: torch.Tensor, target: float = 0.9) -> SpecificityPostProcessor:
    post_processor = SpecificityPostProcessor(target_specificity=target)
    count = normal_scores.numel()
    batch = ImageBatch(
        image=torch.zeros(count, 3, 4, 4), gt_label=torch.zeros(count, dtype=torch.long), pred_score=normal_scores
    )
    post_processor.on_validation_batch_end(None, None, batch)
    post_processor.on_validation_epoch_end(None, None)
    return post_processor


def test_summary_counts_intervals_and_threshold_units() -> None:
    post_processor = _fitted(torch.arange(1.0, 21.0))  # rank ceil(21 * 0.9) = 19 -> 19, moved to 19.5
    summary = summarise(post_processor, tp=7, fp=1, tn=9, fn=3)
    assert (summary.flagged, summary.abnormal, summary.cleared, summary.normal) == (7, 10, 9, 10)
    assert summary.sensitivity == 0.7
    assert summary.specificity == 0.9
    assert summary.sensitivity_ci == clopper_pearson(7, 10)
    assert summary.sensitivity_ci.low == pytest.approx(0.34754715, abs=1e-7)
    assert summary.specificity_ci == clopper_pearson(9, 10)
    assert (summary.threshold_normalized, summary.threshold_raw) == (0.5, 19.5)
    assert (summary.target_specificity, summary.calibration_normals) == (0.9, 20)
    lines = summary.lines()
    assert lines[0] == (
        "Operating point: pred_label = 1 when the score > 0.5 [raw 19.5] (scores as in the score CSV and the exported "
        "model)"
    )
    assert lines[1] == "  threshold set at target specificity 0.9 on n = 20 normal images (validation normals)"
    assert lines[2] == "  test sensitivity 0.700 (7/10 abnormal flagged), 95% CI [0.348, 0.933]"
    assert summary.metrics()["image_Sensitivity_CI_high"] == pytest.approx(0.93326049, abs=1e-7)


def test_an_unfitted_post_processor_reports_no_threshold() -> None:
    assert all(math.isnan(value) for value in thresholds(SpecificityPostProcessor()))
    summary = summarise(None, tp=1, fp=0, tn=1, fn=0)
    assert math.isnan(summary.threshold_raw)
    assert math.isnan(summary.target_specificity)
    assert len(summary.lines()) == 4  # no target line
    unrecorded = summarise(
        SpecificityPostProcessor(), tp=1, fp=0, tn=1, fn=0
    )  # e.g. a checkpoint from before n was saved
    assert "on n (not recorded) normal images" in unrecorded.lines()[1]


def test_too_few_normals_behind_the_threshold_warn(caplog: pytest.LogCaptureFixture) -> None:
    post_processor = _fitted(torch.arange(1.0, 11.0), target=0.95)  # 10 < 19
    with caplog.at_level(logging.WARNING, logger="anomalib_adfa.evaluation.operating_point"):
        summarise(post_processor, tp=1, fp=0, tn=1, fn=0)
    assert "rests on n = 10 normal images, fewer than the 19" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomalib_adfa.evaluation.operating_point"):
        summarise(_fitted(torch.arange(1.0, 21.0), target=0.95), tp=1, fp=0, tn=1, fn=0)
    assert caplog.text == ""


def test_evaluator_counts_the_decisions_of_every_test_batch() -> None:
    evaluator = OperatingPointEvaluator()
    evaluator.on_test_epoch_start(None, None)
    for labels, decisions in (([0, 0, 1], [0, 1, 1]), ([1, 1, 0], [0, 1, 0])):
        batch = ImageBatch(
            image=torch.zeros(3, 3, 4, 4), gt_label=torch.tensor(labels), pred_label=torch.tensor(decisions).bool()
        )
        evaluator.on_test_batch_end(None, None, None, batch, 0)
    tp, fp, tn, fn, _ = (int(value) for value in evaluator.decisions.compute())
    assert (tp, fp, tn, fn) == (2, 1, 2, 1)
