r"""The passes of the fused patch scoring over one chunk of the patch-by-centre block, compiled where possible.

Each function here is one traversal of a chunk ``(R, N)`` of the distance block (``R`` patch rows, ``N``
centres) that reads the chunk once and returns per-row sums, or writes one ``(R, N)`` result. The threshold
search of :mod:`anomalib_adfa.scoring.search` calls them; everything between two calls works on ``(R, 1)``
columns. With ``torch.compile`` (Inductor's C++ backend) each call becomes one vectorised loop over the chunk;
without a working C++ compiler they run as plain PyTorch (several passes each, same values to rounding).

Weights, slopes and gradient from the operator's formulas
--------------------------------------------------------
For a row with threshold :math:`\beta`, slope :math:`b` and shift :math:`c` the weights and slopes are
:func:`~anomalib_adfa.scoring.soft_topk.logistic_weights` of :math:`\beta - b\,(d_j - c)` (one exponential and
one reciprocal per element, written so that the four row sums cost one traversal; its docstring says how), and
the gradient pass composes :func:`~anomalib_adfa.scoring.soft_topk.topk_weight_grad`. The shift, a distance
close to the row's own (its nearest or its mean), keeps the argument free of cancellation: in float32
:math:`\beta - b d` of two terms near 6000 (seen in sharp mode) would leave the threshold search a resolution
of 5e-4, far coarser than its tolerance.

Distances arrive as the raw matmul of :func:`~anomalib_adfa.scoring.distances.distance_operands` (tiny negative
values from rounding included) and are clamped at 0 inside every pass rather than in a pass of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from anomalib_adfa.scoring.soft_topk import logistic_weights, slope_mean, topk_weight_grad

logger = logging.getLogger(__name__)


def weight_terms(
    distances: torch.Tensor, beta: torch.Tensor, slope: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    r"""Clamped distances, weights :math:`z` and slopes :math:`s = z(1 - z)` of a chunk (module docstring).

    Args:
        distances: Raw distances ``(R, N)``.
        beta: Thresholds ``(R, 1)``.
        slope: Slopes :math:`b > 0` of the logits, ``(R, 1)``.
        shift: Shifts :math:`c` of the distances, ``(R, 1)``.

    Returns:
        ``(d, z, s)``, each ``(R, N)``.
    """
    clamped = distances.clamp_min(0.0)
    return clamped, *logistic_weights(beta - slope * (clamped - shift))


def _row_sums(clamped: torch.Tensor, weights: torch.Tensor, slopes: torch.Tensor) -> list[torch.Tensor]:
    return [term.sum(dim=-1, keepdim=True) for term in (weights, slopes, weights * clamped, slopes * clamped)]


def _weight_sums(distances: torch.Tensor, beta: torch.Tensor, slope: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.cat(_row_sums(*weight_terms(distances, beta, slope, shift)), dim=-1)


def _sums_and_gradient(
    distances: torch.Tensor,
    beta: torch.Tensor,
    slope: torch.Tensor,
    shift: torch.Tensor,
    zero: float,
    gradient: torch.Tensor,
) -> torch.Tensor:
    clamped, weights, slopes = weight_terms(distances, beta, slope, shift)
    sums = _row_sums(clamped, weights, slopes)
    # The mean distance is taken from the separate row sums, not from their concatenation: Inductor then fuses
    # the sums and the gradient into one loop over each row (the row stays in L1 between them).
    mean_distance = slope_mean(sums[3], sums[1])
    gradient.copy_(score_gradient(distances, clamped, weights, slopes, slope, mean_distance, zero))
    return torch.cat(sums, dim=-1)


def score_gradient(
    distances: torch.Tensor,
    clamped: torch.Tensor,
    weights: torch.Tensor,
    slopes: torch.Tensor,
    slope: torch.Tensor,
    mean_distance: torch.Tensor,
    zero: float,
) -> torch.Tensor:
    r"""Gradient of each row's score by its squared distances per unit of upstream gradient (:data:`sums_and_gradient`).

    For :math:`s = \sum_j z_j d_j` with logits :math:`a - b d`: :math:`\partial s / \partial d_j = z_j - b\,
    \text{topk\_weight\_grad}(s, d, \bar d)_j`, the direct term and the implicit one with :math:`g = d`.

    Args:
        distances: Raw distances ``(R, n)``.
        clamped: The distances clamped at 0, ``(R, n)``.
        weights: :math:`z`, ``(R, n)``.
        slopes: :math:`s = z (1 - z)`, ``(R, n)``.
        slope: Slopes :math:`b` of the logits, ``(R, 1)``.
        mean_distance: :math:`\bar d = \sum s d / \sum s`, ``(R, 1)``.
        zero: The distance of a clamped squared distance (``> 0`` in the ``"euclidean"`` mode).
    """
    value = weights - slope * topk_weight_grad(slopes, clamped, mean_distance)
    if zero > 0.0:  # "euclidean": d = sqrt(q + eps), so dd/dq = 1 / (2 d)
        value = 0.5 * value / distances
    return torch.where(distances > zero, value, 0.0)


def _row_extremes(distances: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    clamped = distances.clamp_min(0.0)
    centred = clamped - shift
    square = centred * centred
    moments = [centred, square, square * centred, square * square]
    return torch.cat(
        [clamped.amin(dim=-1, keepdim=True), clamped.amax(dim=-1, keepdim=True)]
        + [moment.sum(dim=-1, keepdim=True) for moment in moments],
        dim=-1,
    )


def _group_minima(distances: torch.Tensor, size: int) -> torch.Tensor:
    rows, columns = distances.shape
    return distances.view(rows, size, columns // size).amin(dim=1)


class ChunkKernel:
    """One pass over a chunk: ``torch.compile``'d, or plain PyTorch where it cannot be or need not be.

    Compilation happens at the first call on a chunk of at least :attr:`min_elements` (once per process and
    dtype; Inductor caches the code on disk, so later processes load it in about a second).
    If it fails, typically for want of a C++ compiler, every kernel falls back to plain PyTorch for the rest
    of the process, with one warning. While tracing, exporting or inside another ``torch.compile`` the plain
    function runs (the caller says so with ``eager=False``), so exported graphs hold ordinary operators.
    ``TORCHDYNAMO_DISABLE=1`` (PyTorch's own switch) runs the plain functions throughout.

    Args:
        function: The pass, in plain PyTorch (kept as :attr:`function`).
        min_elements: A lower :attr:`min_elements` for this kernel (``own_min_elements``), for work on per-row
            columns rather than on a chunk: there a call of a few thousand elements already costs a millisecond
            of eager operator dispatch.
    """

    compiler_failed = False
    min_elements = 1 << 18
    """Chunks smaller than this run plain: their pass costs well under a millisecond, while every new shape
    class costs the compiler seconds (small images, short last chunks, the few rows left for a second search
    step)."""

    def __init__(self, function: Callable[..., Any], min_elements: int | None = None) -> None:
        self.function = function
        self.own_min_elements = min_elements
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, eager: bool) -> Any:
        """Run the pass on ``args``; ``eager=False`` (tracing, exporting, compiling) runs the plain function."""
        if not eager:
            return self.function(*args)
        threshold = ChunkKernel.min_elements
        if self.own_min_elements is not None:
            threshold = min(threshold, self.own_min_elements)
        if ChunkKernel.compiler_failed or args[0].numel() < threshold:
            return self.function(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.function, dynamic=True, fullgraph=True)
        try:
            return self._compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as err:
            ChunkKernel.compiler_failed = True
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            logger.warning(
                "torch.compile could not build ADFA's scoring kernels (%s); running them as plain PyTorch, "
                "which gives the same scores, more slowly.",
                reason,
            )
            return self.function(*args)


weight_sums = ChunkKernel(_weight_sums)
r"""``weight_sums(distances (R, N), beta (R, 1), slope (R, 1), shift (R, 1)) -> (R, 4)``: row sums
:math:`[\sum z,\ \sum s,\ \sum z d,\ \sum s d]`, one evaluation of the threshold search. :math:`\sum z - k` is
its residual and :math:`\sum s` its slope, :math:`\sum z d` the patch score, and :math:`\sum s d / \sum s` the
weighted mean distance :math:`\bar d` of the backward pass."""

sums_and_gradient = ChunkKernel(_sums_and_gradient)
r"""``sums_and_gradient(distances, beta, slope, shift, zero, gradient (R, N)) -> (R, 4)``: :data:`weight_sums`, and
the gradient of each row's score by its squared distances per unit of upstream gradient written into ``gradient``,
in one pass. For :math:`s = \sum_j z_j d_j` with logits :math:`a - b d` the implicit gradient of the soft top-k
(:func:`~anomalib_adfa.scoring.soft_topk.topk_weight_grad`) gives :math:`\partial s / \partial d_j = z_j - b\, s_j
(d_j - \bar d)` with :math:`\bar d = \sum s d / \sum s`, a sum of the same pass. The clamp at 0 passes no gradient
where it is active (``distances <= zero``); with ``zero > 0`` (the ``"euclidean"`` mode, ``distances`` already
:math:`\sqrt{q + \epsilon}` and ``zero`` :math:`= \sqrt\epsilon`) the chain rule adds :math:`1 / (2 d)`."""

row_extremes = ChunkKernel(_row_extremes)
r"""``row_extremes(distances, shift (R, 1)) -> (R, 6)``: :math:`\min d`, :math:`\max d` and the sums
:math:`\sum (d - c)^j`, :math:`j = 1 .. 4`, of the clamped distances; the shift :math:`c`, close to the row mean,
keeps the moments free of cancellation."""

group_minima = ChunkKernel(_group_minima)
"""``group_minima(distances (R, N), m) -> (R, N // m)``: the minimum of each group of ``m`` columns ``g + i N / m``."""
