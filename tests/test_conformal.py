"""Finite-sample rules: the conformal rank on hand-computed cases, Clopper-Pearson against known values, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from anomalib_adfa.evaluation.conformal import (
    check_specificity,
    clopper_pearson,
    conformal_rank,
    false_alarm_bound,
    min_calibration_normals,
)


@pytest.mark.parametrize(
    ("count", "target", "rank"),
    [
        (29, 0.95, 29),  # (30)(0.95) = 28.5 -> 29: BrainMRI's held-out half; ceil(q n) gave 28
        (58, 0.95, 57),  # (59)(0.95) = 56.05 -> 57: all BrainMRI training normals
        (19, 0.95, 19),  # (20)(0.95) = 19 exactly (not 19.000000000000004 -> 20)
        (99, 0.9, 90),  # (100)(0.9) = 90 exactly
        (100, 0.95, 96),  # 95.95 -> 96
        (9, 0.5, 5),  # (10)(0.5) = 5
        (10, 0.5, 6),  # 5.5 -> 6
        (12, 0.99, 12),  # 12.87 > n: clipped to the largest score
        (1, 0.5, 1),
    ],
)
def test_conformal_rank_on_hand_computed_cases(count: int, target: float, rank: int) -> None:
    assert conformal_rank(count, target) == rank


@pytest.mark.parametrize(("target", "needed"), [(0.95, 19), (0.9, 9), (0.99, 99), (0.5, 1), (0.8, 4)])
def test_minimum_normals_is_the_first_n_whose_rank_fits(target: float, needed: int) -> None:
    assert min_calibration_normals(target) == needed
    # n = needed: (n + 1) q <= n, so the bound 1 - k / (n + 1) is at most alpha; n = needed - 1: it is not.
    assert false_alarm_bound(needed, target) <= 1 - target + 1e-12
    assert needed == 1 or false_alarm_bound(needed - 1, target) > 1 - target


def test_the_rank_bounds_the_false_alarm_rate_of_new_exchangeable_scores() -> None:
    """Monte Carlo over calibration draws: P(new normal > s_(k)) <= alpha, and near it (split conformal)."""
    rng = np.random.default_rng(0)
    count, target, draws = 29, 0.9, 20000
    scores = rng.normal(size=(draws, count + 1))
    rank = conformal_rank(count, target)
    thresholds = np.sort(scores[:, :count], axis=1)[:, rank - 1]
    rate = float((scores[:, count] > thresholds).mean())
    assert rate == pytest.approx(false_alarm_bound(count, target), abs=0.006)  # 1 - 27/30 = 0.1
    assert rate <= 1 - target + 0.006


@pytest.mark.parametrize(("successes", "trials"), [(7, 10), (0, 10), (10, 10), (1, 1), (52, 100), (38, 40), (3, 155)])
def test_clopper_pearson_matches_scipy_exact_interval(successes: int, trials: int) -> None:
    expected = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact")
    low, high = clopper_pearson(successes, trials)
    assert low == pytest.approx(expected.low, abs=1e-9)
    assert high == pytest.approx(expected.high, abs=1e-9)


def test_clopper_pearson_known_values() -> None:
    # Textbook values: 0 of 10 -> [0, 0.3085] (the "rule of three"-like upper bound), 7 of 10 -> [0.3475, 0.9333].
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.30849710), abs=1e-7)
    assert clopper_pearson(7, 10) == pytest.approx((0.34754715, 0.93326049), abs=1e-7)
    assert math.isnan(clopper_pearson(0, 0).low)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "0.9", True, float("nan")])
def test_a_target_outside_zero_one_is_refused_naming_the_option(value: object) -> None:
    with pytest.raises(ValueError, match=r"target_specificity must be a number strictly between 0 and 1"):
        check_specificity(value)  # type: ignore[arg-type]


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one normal score"):
        conformal_rank(0, 0.95)
    with pytest.raises(ValueError, match="between 0 and trials"):
        clopper_pearson(11, 10)
