"""Finite-sample rules of an operating point: the conformal rank of the threshold, and exact binomial intervals.

Threshold rule (split conformal)
--------------------------------
Let ``s_(1) <= ... <= s_(n)`` be the scores of ``n`` normal images the model did not train on, ``q`` the target
specificity and ``alpha = 1 - q``. The threshold is ``t = s_(k)`` with ``k = ceil((n + 1) q)`` (:func:`conformal_rank`),
and an image is flagged when its score is ``> t``. If a new normal image's score is exchangeable with the ``n``
(same distribution, scored by the same model that none of them trained), its rank among the ``n + 1`` scores is
uniform, so ``P(false alarm) = P(s_new > s_(k)) <= 1 - k / (n + 1) <= alpha``; without ties it is also at least
``alpha - 1 / (n + 1)``. This holds for any ``n`` and any score distribution, but only on average over the draw of
the ``n`` calibration images: one threshold's false-alarm rate scatters around it (a Beta(``n + 1 - k``, ``k``) law).

- ``from_train`` / ``synthetic`` (a held-out calibration split of the training normals) satisfy it exactly:
  the deployed model never saw the calibration normals.
- ``crossfit`` (:class:`.CrossFitThreshold`: the deployed model trains on *all* normals and
  the scores come from ``K`` fold models, each scoring the normals it did not train on) is cross-conformal / CV+:
  the split-conformal bound does not hold; the cross-conformal worst case is about ``2 alpha`` (Barber, Candès,
  Ramdas, Tibshirani 2021, "Predictive inference with the jackknife+", for the fold models' scores), and applying
  the threshold to the refitted model's score further assumes that it scores like the fold models (stable training,
  each fold model trains on ``(K - 1) / K`` of the normals). Typical rates are near ``alpha``; the benchmark's
  calibration gap measures it. Its gain: the deployed model trains on all normals (twice those of a 50 % hold-out)
  and the threshold rests on all ``n`` of them instead of half.
- ``same_as_test`` (the paper's) calibrates on the test images themselves: no guarantee for new images.

``k <= n`` needs ``n >= 1 / alpha - 1`` (19 normals for 95 %); with fewer the threshold is the largest score
``s_(n)`` and the bound is only ``1 / (n + 1)`` (:func:`min_calibration_normals`, warned about at fitting).

Intervals
---------
:func:`clopper_pearson` gives the exact binomial (Clopper-Pearson) interval of a proportion such as the test
sensitivity (flagged / abnormal) or specificity (cleared / normal): conservative, never narrower than it should be,
and valid for proportions of 0 or 1 where the normal approximation collapses.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

from scipy.stats import beta


class Interval(NamedTuple):
    """A two-sided confidence interval."""

    low: float
    high: float


def check_specificity(value: float, option: str = "target_specificity") -> float:
    """Return ``value`` as a float, or raise a one-line error naming ``option`` when it is not in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        msg = f"{option} must be a number strictly between 0 and 1 (e.g. 0.95), got {value!r}"
        raise ValueError(msg)
    return float(value)


def conformal_rank(count: int, target_specificity: float) -> int:
    """1-based rank ``k = ceil((n + 1) q)``, clipped to ``[1, n]``, of the normal score used as threshold.

    ``q`` is read as the decimal it prints as (``Fraction(str(q))``), so ``(19 + 1) * 0.95`` is exactly 19.

    Args:
        count: ``n``, the number of calibration normal scores (at least 1).
        target_specificity: ``q`` in (0, 1).

    Returns:
        ``k``; equal to ``n`` (the largest score) when ``n < 1 / (1 - q) - 1``.

    Example:
        >>> conformal_rank(29, 0.95), conformal_rank(19, 0.95), conformal_rank(100, 0.95)
        (29, 19, 96)
    """
    if count < 1:
        msg = f"need at least one normal score to set a threshold, got {count}"
        raise ValueError(msg)
    exact = Fraction(str(check_specificity(target_specificity))) * (count + 1)
    return min(count, max(1, math.ceil(exact)))


def min_calibration_normals(target_specificity: float) -> int:
    """Smallest ``n`` whose conformal rank is at most ``n``, i.e. ``ceil(1 / (1 - q) - 1)`` (19 for 0.95)."""
    alpha = 1 - Fraction(str(check_specificity(target_specificity)))
    return math.ceil(1 / alpha - 1)


def false_alarm_bound(count: int, target_specificity: float) -> float:
    """Split-conformal bound ``1 - k / (n + 1)`` on a new normal image's false-alarm probability.

    It is at most ``1 - q`` when ``n >= 1 / (1 - q) - 1``, and ``1 / (n + 1)`` otherwise.
    """
    return 1 - conformal_rank(count, target_specificity) / (count + 1)


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> Interval:
    """Exact binomial (Clopper-Pearson) confidence interval of ``successes / trials``.

    The bounds are Beta quantiles: ``low = Beta(a/2; x, n - x + 1)``, ``high = Beta(1 - a/2; x + 1, n - x)`` with
    ``a = 1 - level``; ``low = 0`` when ``x = 0`` and ``high = 1`` when ``x = n``.

    Args:
        successes: ``x``, e.g. abnormal test images flagged.
        trials: ``n``, e.g. abnormal test images; ``0`` gives ``(nan, nan)``.
        level: Coverage, in (0, 1).

    Returns:
        The interval.

    Example:
        >>> tuple(round(v, 4) for v in clopper_pearson(7, 10))
        (0.3475, 0.9333)
    """
    if not 0 <= successes <= trials:
        msg = f"successes must be between 0 and trials, got {successes} of {trials}"
        raise ValueError(msg)
    if trials == 0:
        return Interval(math.nan, math.nan)
    tail = (1 - check_specificity(level, "level")) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return Interval(low, high)
