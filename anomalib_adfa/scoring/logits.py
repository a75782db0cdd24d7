r"""From distances to the operator's logits, and where each mode's threshold search starts.

Both soft modes turn distances into logits by an affine map :math:`x = a - b (d - c)` with detached
coefficients (:class:`LogitMap`; the derivation of the cost is in :mod:`anomalib_adfa.scoring.soft_topk`):

- ``"reference"``: :math:`M` is the image's largest cost (:func:`reference_logit_map`), the published
  normalisation taken per image so that a score does not depend on its batch mates;
- ``"sharp"``: a per-patch scale from the gap between the nearest and the ``(K+1)``-th nearest distance
  (:func:`sharp_logit_map`).

The starts put the Newton search of :func:`~anomalib_adfa.scoring.soft_topk.newton_threshold` close to its
root: the reference mode's from each row's moments (:func:`moment_start`), the sharp mode's from its nearest
logits alone (:func:`nearest_subset_start`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from anomalib_adfa.scoring.soft_topk import newton_threshold, sigmoid_sums

# Steps of the sharp start's search on the few nearest logits (cheap: a handful of elements per row).
SUBSET_SOLVER_STEPS = 12

_SHARP_SCALE_FLOOR = 1e-12


def sharp_start(top_logits: torch.Tensor, k: int) -> torch.Tensor:
    r"""Threshold midway between the ``k``-th and ``(k+1)``-th largest logits.

    There :math:`\sigma` splits those two logits symmetrically around 1/2, which is close to the
    root whenever the selection is sharp, so Newton starts in its quadratic regime.

    Args:
        top_logits: The ``k + 1`` largest logits of each row, in decreasing order, ``(..., k + 1)``.
        k: Number of selected elements.

    Returns:
        Start ``(..., 1)``.
    """
    return -0.5 * (top_logits[..., k - 1 : k] + top_logits[..., k : k + 1])


class LogitMap(NamedTuple):
    r"""Affine map from distances to logits, :math:`x = a - b (d - c)`, with detached coefficients.

    Attributes:
        offset: :math:`a`, broadcastable to the distances.
        slope: :math:`b > 0`, broadcastable to the distances.
        shift: :math:`c`, broadcastable to the distances.
        start: First iterate of the threshold search ``(..., 1)``, or ``None`` for the uniform start.
    """

    offset: torch.Tensor
    slope: torch.Tensor
    shift: torch.Tensor
    start: torch.Tensor | None

    def __call__(self, distances: torch.Tensor) -> torch.Tensor:
        """Logits of ``distances``."""
        return self.offset - (distances - self.shift) * self.slope


def reference_logit_map(d_min: torch.Tensor, d_max: torch.Tensor, epsilon: float) -> LogitMap:
    r"""Logit map of the ``"reference"`` mode from each image's extreme distances.

    :math:`\max_d \max(d^2, (d - 1)^2)` over an image is reached at its smallest or largest distance
    (both functions are convex), so the two extremes give the normaliser :math:`M` exactly.

    Args:
        d_min: Smallest distance of each image, ``(B, 1, 1)``.
        d_max: Largest distance of each image, ``(B, 1, 1)``.
        epsilon: Entropic regularisation.

    Returns:
        The map :math:`x = (1 - 2 d) / (M \varepsilon)`.
    """
    cost_scale = torch.stack([d_max.square(), (d_max - 1.0).square(), (d_min - 1.0).square()]).amax(dim=0)
    inverse = 1.0 / (cost_scale * epsilon)
    return LogitMap(inverse, 2.0 * inverse, torch.zeros_like(inverse), None)


def sharp_logit_map(nearest: torch.Tensor, k: int, epsilon: float) -> LogitMap:
    r"""Logit map of the ``"sharp"`` mode from each row's ``k + 1`` smallest distances.

    Args:
        nearest: The ``k + 1`` smallest distances of each row, increasing, ``(..., k + 1)``.
        k: Number of selected elements.
        epsilon: Entropic regularisation.

    Returns:
        The map :math:`x = (1 - 2 (d - d_{(1)}) / (d_{(k+1)} - d_{(1)})) / \varepsilon` with the start
        of :func:`sharp_start`.
    """
    shift = nearest[..., :1]
    slope = 2.0 / ((nearest[..., -1:] - shift).clamp_min(_SHARP_SCALE_FLOOR) * epsilon)
    offset = torch.full_like(shift, 1.0 / epsilon)
    mapping = LogitMap(offset, slope, shift, None)
    return mapping._replace(start=sharp_start(mapping(nearest), k))


def moment_start(moments: torch.Tensor, k: int, n: int, num_iterations: int = 4) -> torch.Tensor:
    r"""Threshold start of the ``"reference"`` mode from the first four moments of each row's logit offsets.

    Write the weights as :math:`\sigma(u + \delta_i)` with offsets :math:`\delta_i` of raw moments
    :math:`M_j = \frac{1}{n}\sum_i \delta_i^j` and central moments :math:`V_j` (:math:`V_1 = 0`).
    Taylor-expanding each weight around :math:`v = u + M_1`,

    .. math::

        \frac{F + k}{n} \approx \sum_{j=0}^{4} \sigma^{(j)}(v) \frac{V_j}{j!}, \qquad
        \sigma' = p = \sigma(1 - \sigma),\ \sigma^{(2)} = p (1 - 2\sigma),\
        \sigma^{(3)} = p (1 - 6\sigma + 6\sigma^2),\ \sigma^{(4)} = p (1 - 2\sigma)(1 - 12\sigma + 12\sigma^2),

    and a few scalar Newton steps on this expansion, from the uniform start :math:`v = \operatorname{logit}(k/n)`
    (exact for equal logits), give its root :math:`u_0 = v - M_1`. The error is of fifth order in the spread of
    the offsets, which the reference normalisation keeps small, so the first evaluation of the full rows
    usually meets the tolerance.

    Args:
        moments: :math:`[M_1, M_2, M_3, M_4]` per row, ``(..., 4)``.
        k: Number of selected elements.
        n: Number of elements per row.
        num_iterations: Newton steps on the expansion (each a handful of operations per row).

    Returns:
        :math:`u_0`, ``(..., 1)``.
    """
    m1, m2, m3, m4 = moments.unbind(dim=-1)
    # Expand around the mean offset: central moments (the first is 0).
    v2 = m2 - m1.square()
    v3 = m3 - 3.0 * m1 * m2 + 2.0 * m1.pow(3)
    v4 = m4 - 4.0 * m1 * m3 + 6.0 * m1.square() * m2 - 3.0 * m1.pow(4)
    target = k / n
    u = torch.full_like(m1, math.log(k / (n - k)))  # u + M_1, the uniform start
    for _ in range(num_iterations):
        s = torch.sigmoid(u)
        p = s * (1.0 - s)
        c2, c3 = 1.0 - 2.0 * s, 1.0 - 6.0 * s + 6.0 * s * s
        c4 = c2 * (1.0 - 12.0 * s + 12.0 * s * s)
        c5 = 1.0 - 30.0 * s + 150.0 * s.square() - 240.0 * s.pow(3) + 120.0 * s.pow(4)
        value = s + p * (c2 * v2 / 2.0 + c3 * v3 / 6.0 + c4 * v4 / 24.0) - target
        slope = p * (1.0 + c3 * v2 / 2.0 + c4 * v3 / 6.0 + c5 * v4 / 24.0)
        u = u - value / slope.clamp_min(torch.finfo(u.dtype).tiny)
    return (u - m1).unsqueeze(-1)


def nearest_subset_start(
    top_logits: torch.Tensor, k: int, num_iterations: int, tol: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Threshold start of the ``"sharp"`` mode: the root for the ``m > k`` largest logits alone, and an upper bound.

    Leaving out the other logits removes positive terms from :math:`F`, so the subset's root lies above the full
    one, by the little mass the left-out terms carry when the selection is sharp. The bound: at the full root
    the ``k + 1`` largest logits have weights of at least :math:`z_{(k+1)}` and sum to at most ``k``, so
    :math:`z_{(k+1)} \le k / (k + 1)`, i.e. :math:`\tau \le \log k - x_{(k+1)}`; it does not depend on how
    exactly the subset's root is found.

    Args:
        top_logits: The ``m`` largest logits of each row, in decreasing order, ``(..., m)``.
        k: Number of selected elements, ``k < m``.
        num_iterations: Step budget of the subset's search (from :func:`sharp_start`).
        tol: Its relative tolerance, or ``None``.

    Returns:
        Start and upper bound of :math:`\tau`, each ``(..., 1)``.
    """
    logit_ratio = math.log(k / (top_logits.shape[-1] - k))
    lower = logit_ratio - top_logits[..., :1]
    upper = logit_ratio - top_logits[..., -1:]

    evaluate = functools.partial(sigmoid_sums, top_logits)
    start = newton_threshold(evaluate, k, sharp_start(top_logits, k), lower, upper, num_iterations, tol)[0]
    return start, math.log(k) - top_logits[..., k : k + 1]
