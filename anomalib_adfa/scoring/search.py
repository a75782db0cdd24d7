r"""The fused backend's threshold search: per-row starts for all rows at once, then the search on each chunk.

Each row searches the threshold :math:`\beta` of weights :math:`\sigma(\beta - b\,(d - c))` (a :class:`RowSearch`:
slope :math:`b`, shift :math:`c`, start and bracket). The starts come from per-row statistics gathered in the
first sweep (:func:`reference_search`, :func:`sharp_root`); :func:`search_chunk` then runs
:func:`~anomalib_adfa.scoring.soft_topk.newton_threshold` on a chunk of rows with one pass of
:mod:`anomalib_adfa.scoring.kernels` per evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from anomalib_adfa.scoring import kernels
from anomalib_adfa.scoring.logits import (
    SUBSET_SOLVER_STEPS,
    moment_start,
    nearest_subset_start,
    reference_logit_map,
    sharp_logit_map,
)
from anomalib_adfa.scoring.soft_topk import TopKSettings, newton_step, newton_threshold


class RowSearch(NamedTuple):
    """Per-row search of a soft mode for weights ``sigmoid(beta - slope * (d - shift))``; fields ``(..., 1)``."""

    slope: torch.Tensor
    shift: torch.Tensor
    start: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor


def _reference_search(statistics: torch.Tensor, shift: torch.Tensor, k: int, epsilon: float, n: int) -> RowSearch:
    """Search of the ``"reference"`` mode from the :data:`~anomalib_adfa.scoring.kernels.row_extremes` of every row.

    ``statistics`` ``(B, T, 6)``, ``shift`` ``(B, T)``; run as :data:`reference_search`.
    """
    d_min, d_max = statistics[..., :1], statistics[..., 1:2]
    mapping = reference_logit_map(d_min.amin(dim=1, keepdim=True), d_max.amax(dim=1, keepdim=True), epsilon)
    slope = mapping.slope.expand_as(d_min)  # x = offset - slope * d, so beta = tau + offset - slope * shift
    shift = shift.unsqueeze(-1)
    powers = torch.arange(1, 5, device=slope.device, dtype=slope.dtype)
    moments = statistics[..., 2:] / n * (-slope) ** powers  # of the offsets -slope (d - shift)
    logit_ratio = math.log(k / (n - k))
    lower = logit_ratio + slope * (d_min - shift)
    upper = logit_ratio + slope * (d_max - shift)
    start = moment_start(moments, k, n)
    return RowSearch(slope, shift, torch.minimum(torch.maximum(start, lower), upper), lower, upper)


reference_search = kernels.ChunkKernel(_reference_search, min_elements=1 << 13)
"""``reference_search(statistics, shift, k, epsilon, n, eager=...) -> RowSearch``: :func:`_reference_search`,
compiled (its few hundred operations on ``(B, T)`` columns cost about 3 ms per image as eager operators)."""


def sharp_root(
    nearest: torch.Tensor, k: int, epsilon: float, n: int, tol: float | None
) -> tuple[torch.Tensor, torch.Tensor, RowSearch]:
    """Solve sharp mode on each row's nearest distances ``(..., m)``, increasing, alone.

    Returns:
        Their logits, the root of the threshold problem on them alone
        (:func:`~anomalib_adfa.scoring.logits.nearest_subset_start`, to ``tol``), and the :class:`RowSearch` of
        the full rows of ``n`` distances from there (the root bounds the full one from above).
    """
    mapping = sharp_logit_map(nearest[..., : k + 1], k, epsilon)  # x = offset - slope * (d - shift)
    logits = mapping(nearest)
    start, upper = nearest_subset_start(logits, k, SUBSET_SOLVER_STEPS, tol)
    lower = math.log(k / (n - k)) + torch.zeros_like(start)  # at d = shift, the nearest distance
    offset = mapping.offset
    return logits, start, RowSearch(mapping.slope, mapping.shift, start + offset, lower + offset, upper + offset)


def _evaluation(distances: torch.Tensor, slope: torch.Tensor, shift: torch.Tensor, eager: bool) -> Callable:
    """:func:`~anomalib_adfa.scoring.soft_topk.newton_threshold`'s evaluation: one :data:`weight_sums` pass."""

    def sums_at(beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sums = kernels.weight_sums(distances, beta, slope, shift, eager=eager)
        return sums[:, :1], sums[:, 1:2], sums

    return sums_at


def search_chunk(
    chunk: torch.Tensor,
    search: RowSearch,
    topk: TopKSettings,
    tol: float | None,
    gradient: torch.Tensor | None,
    zero: float,
) -> torch.Tensor:
    """Threshold search on the rows ``(R, N)`` of one chunk; returns the row sums ``(R, 4)`` of the last evaluation.

    With a ``gradient`` buffer ``(R, N)`` it is filled with :data:`~anomalib_adfa.scoring.kernels.sums_and_gradient`'s
    gradient at the final thresholds. With ``tol=None`` (tracing, exporting) every row makes the mode's fixed
    number of steps. Otherwise the first evaluation covers every row and computes the gradient too, on the chance
    (usual from the starts) that it meets the tolerance; only the rows it leaves outside continue, on a copy of
    their distances, with sums-only evaluations and a last pass for their gradient.
    """
    steps, k, eager = topk.max_steps, topk.k, tol is not None
    if not eager:
        beta, sums = newton_threshold(
            _evaluation(chunk, search.slope, search.shift, eager),
            k,
            search.start,
            search.lower,
            search.upper,
            steps,
            None,
        )
        if gradient is None:
            return sums
        return kernels.sums_and_gradient(chunk, beta, search.slope, search.shift, zero, gradient, eager=eager)
    if gradient is None:
        sums = kernels.weight_sums(chunk, search.start, search.slope, search.shift, eager=eager)
    else:
        sums = kernels.sums_and_gradient(chunk, search.start, search.slope, search.shift, zero, gradient, eager=eager)
    residual = sums[:, :1] - k
    pending = (residual.abs() > tol * k).squeeze(-1)
    if steps == 0 or not bool(pending.any()):
        return sums
    # Most rows pending: continue on the chunk itself; a few: on a copy of theirs.
    rows = None if 2 * int(pending.sum()) > pending.numel() else pending.nonzero().squeeze(-1)

    def pick(value: torch.Tensor) -> torch.Tensor:
        return value if rows is None else value[rows]

    start, lower, upper = newton_step(
        pick(search.start), pick(residual), pick(sums[:, 1:2]), pick(search.lower), pick(search.upper)
    )
    distances, slope, shift = pick(chunk), pick(search.slope), pick(search.shift)
    beta, row_sums = newton_threshold(
        _evaluation(distances, slope, shift, eager), k, start, lower, upper, steps - 1, tol
    )
    if gradient is not None:
        row_gradient = gradient if rows is None else torch.empty_like(distances)
        row_sums = kernels.sums_and_gradient(distances, beta, slope, shift, zero, row_gradient, eager=eager)
        if rows is not None:
            gradient[rows] = row_gradient
    if rows is None:
        return row_sums
    sums[rows] = row_sums
    return sums
