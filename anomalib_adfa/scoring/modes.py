r"""The fused backend's algorithm per top-k mode over one sweep of images: scores and gradient directions.

Every function here takes the operands of :func:`~anomalib_adfa.scoring.distances.distance_operands` for a group
of images, ``(B, T, D' + 2)`` and ``(N, D' + 2)``, and returns the patch scores ``(B, T)`` and, with a gradient,
the directions :math:`G \hat c` per unit of upstream gradient, ``(B, T, D' + 2)``: each row's score depends on its
patch only, so the backward pass only scales rows, and the matmul with the centre operand runs here, on chunks
still in cache, instead of on stored distances.

- :func:`hard_scores`: one matmul per chunk, then its ``K`` smallest distances;
- :func:`sharp_candidate_scores` (eager sharp mode): one matmul per chunk, then its :data:`SHARP_CANDIDATES`
  smallest distances, on which the threshold problem is solved alone wherever the centres left out provably
  carry no weight float32 can register (the other rows, rare, run the full search);
- :func:`soft_sweep_scores` (reference mode, and sharp mode while tracing or exporting): a first sweep computes
  every chunk's distances with what the search needs to start, the starts are computed for all rows at once,
  and a second sweep runs :func:`~anomalib_adfa.scoring.search.search_chunk` on each chunk, then the gradient
  pass and its matmul.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from anomalib_adfa.scoring import kernels
from anomalib_adfa.scoring.chunking import chunk_bounds
from anomalib_adfa.scoring.distances import EUCLIDEAN_EPS, distance_zero, operand_distances
from anomalib_adfa.scoring.memory import sweep_memory
from anomalib_adfa.scoring.search import RowSearch, reference_search, search_chunk, sharp_root
from anomalib_adfa.scoring.selection import nearest_count, selected_directions, smallest_distances
from anomalib_adfa.scoring.soft_topk import TopKSettings, logistic_weights, slope_mean

# Nearest distances whose threshold problem starts the sharp mode's search (nearest_subset_start). On a Lite0
# BrainMRI batch the first evaluation of the full rows then met the tolerance on 99.9 % of rows (16: on all, at a
# costlier selection; K + 1 = 4: on under half, most others needing two or three more); search_chunk carries the
# few others on alone.
SHARP_START_NEAREST = 8

# Nearest centres on which eager sharp mode solves each patch's threshold (sharp_candidate_scores). On a Lite0
# BrainMRI batch at most 17 centres of a patch lay within 2.23 (d_(K+1) - d_(1)) of its nearest, where the weights
# fall below 2^-30 of K.
SHARP_CANDIDATES = 16

# Total weight that the centres left out of a sharp-mode row may carry for the row to be accepted, in units of
# the dtype's eps times K (below the rounding of the row's weight sum).
PRUNED_MASS_EPS = 1 / 16

Result = tuple[torch.Tensor, torch.Tensor | None]


class Sweep(NamedTuple):
    """What one sweep needs besides the operands.

    Attributes:
        topk: Settings of the operator.
        euclidean: Whether the distances are the square roots of the squared ones.
        rows_per_chunk: Patch rows per image in one chunk.
        tol: Relative tolerance of the searches' early exits; ``None`` while tracing or exporting, which also
            runs every pass plain (no compiled or C kernels, no kept memory, fixed step counts).
        with_gradient: Whether to compute the gradient directions.
    """

    topk: TopKSettings
    euclidean: bool
    rows_per_chunk: int
    tol: float | None
    with_gradient: bool


def _chunk_distances(
    patch_operand: torch.Tensor, center_operand: torch.Tensor, a: int, b: int, sweep: Sweep
) -> torch.Tensor:
    """Distances ``(B * (b - a), N)`` of the patch rows ``[a, b)`` of every image."""
    rows = patch_operand[:, a:b].reshape(-1, patch_operand.shape[-1])
    return operand_distances(rows, center_operand, sweep.euclidean)


def hard_scores(patch_operand: torch.Tensor, center_operand: torch.Tensor, sweep: Sweep) -> Result:
    """Hard mode: the sum of each row's ``K`` smallest distances, and the directions of the selected centres."""
    batch, num_patches, width = patch_operand.shape
    zero, eager = distance_zero(sweep.euclidean), sweep.tol is not None
    scores, directions = [], []
    for a, b in chunk_bounds(num_patches, sweep.rows_per_chunk):
        chunk = _chunk_distances(patch_operand, center_operand, a, b, sweep)
        values, indices = smallest_distances(chunk, sweep.topk.k, eager)
        scores.append(values.sum(dim=-1).view(batch, b - a))
        if sweep.with_gradient:
            chain = 0.5 / values if sweep.euclidean else torch.ones_like(values)
            chain = torch.where(values > zero, chain, 0.0)
            directions.append(selected_directions(chain, indices, center_operand).view(batch, b - a, width))
    return torch.cat(scores, dim=1), torch.cat(directions, dim=1) if sweep.with_gradient else None


def sharp_candidate_scores(patch_operand: torch.Tensor, center_operand: torch.Tensor, sweep: Sweep) -> Result:
    r"""Eager sharp mode: each row solved on its :data:`SHARP_CANDIDATES` nearest distances where that is exact.

    With logits :math:`x = a - b (d - d_{(1)})` spread by :math:`2 / \varepsilon` between the nearest and the
    ``(K+1)``-th nearest distance, the weights fall off exponentially with the distance: only a handful of
    centres per patch carry weight that float32 can register. The threshold problem is solved on the ``C``
    nearest alone (:func:`~anomalib_adfa.scoring.logits.nearest_subset_start`, to the tolerance), and a row is
    accepted when the ``N - C`` centres left out, each of weight at most :math:`\sigma(x_{(C)} + \tau)`,
    carry at most :data:`PRUNED_MASS_EPS` of the dtype's eps times ``K`` together: then the full row's
    residual is within the tolerance too. Their share of the score is smaller still (:math:`z d` decreases
    beyond :math:`d_{(C)}`, as :math:`b\, d_{(C)} \ge 2 / \varepsilon > 1`), and so is their share of the
    gradient (``tests/test_scoring_fused.py`` compares both with the full rows). The rows not accepted (under
    1 % of a Lite0 BrainMRI batch) run the full search of :func:`~anomalib_adfa.scoring.search.search_chunk`
    from the subset's root, which bounds the full one from above. The gradient directions come from the
    selected centre operands, as in hard mode.
    """
    batch, num_patches, width = patch_operand.shape
    k, num_centers, tol = sweep.topk.k, center_operand.shape[0], sweep.tol
    count = nearest_count(k, num_centers, SHARP_CANDIDATES)
    nearest, columns = [], []
    for a, b in chunk_bounds(num_patches, sweep.rows_per_chunk):
        values, indices = smallest_distances(_chunk_distances(patch_operand, center_operand, a, b, sweep), count)
        nearest.append(values.view(batch, b - a, count))
        columns.append(indices.view(batch, b - a, count))
    nearest, columns = torch.cat(nearest, dim=1).flatten(0, 1), torch.cat(columns, dim=1).flatten(0, 1)
    zero = distance_zero(sweep.euclidean)
    scores, chain, accepted, search = sharp_subset(nearest, k, sweep.topk.epsilon, num_centers, tol, zero, eager=True)
    directions = selected_directions(chain, columns, center_operand) if sweep.with_gradient else None
    if not bool(accepted.all()):
        rows = (~accepted).squeeze(-1).nonzero().squeeze(-1)
        distances = operand_distances(patch_operand.flatten(0, 1)[rows], center_operand, sweep.euclidean)
        gradient = torch.empty_like(distances) if sweep.with_gradient else None
        sums = search_chunk(distances, RowSearch(*(field[rows] for field in search)), sweep.topk, tol, gradient, zero)
        scores[rows] = sums[:, 2]
        if sweep.with_gradient:
            directions[rows] = gradient @ center_operand
    scores = scores.view(batch, num_patches)
    return scores, directions.view(batch, num_patches, width) if sweep.with_gradient else None


def _sharp_subset(
    nearest: torch.Tensor, k: int, epsilon: float, num_centers: int, tol: float, zero: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RowSearch]:
    """Solve :func:`sharp_candidate_scores`' rows on their ``C`` nearest distances ``(R, C)`` (:data:`sharp_subset`).

    Returns:
        Scores ``(R,)``; the gradient of each score by the ``C`` distances ``(R, C)``, per unit of upstream
        gradient; whether each row is accepted ``(R, 1)``; and the :class:`~anomalib_adfa.scoring.search.RowSearch`
        (fields ``(R, 1)``) from which the rows not accepted continue on their full distances.
    """
    # Compiled, the subset's search runs its SUBSET_SOLVER_STEPS without the early exit (a handful of elements; a
    # data-dependent exit cannot be compiled into one graph); eager, it stops at the tolerance.
    logits, start, search = sharp_root(nearest, k, epsilon, num_centers, None if torch.compiler.is_compiling() else tol)
    weights, slopes = logistic_weights(logits + start)
    left_out = (num_centers - nearest.shape[-1]) * logistic_weights(logits[:, -1:] + start)[0]
    limit = PRUNED_MASS_EPS * torch.finfo(nearest.dtype).eps * k
    accepted = ((weights.sum(dim=-1, keepdim=True) - k).abs() <= tol * k) & (left_out <= limit)
    mean_distance = slope_mean((slopes * nearest).sum(dim=-1, keepdim=True), slopes.sum(dim=-1, keepdim=True))
    chain = kernels.score_gradient(nearest, nearest, weights, slopes, search.slope, mean_distance, zero)
    return (weights * nearest).sum(dim=-1), chain, accepted, search


sharp_subset = kernels.ChunkKernel(_sharp_subset, min_elements=1 << 13)
"""``sharp_subset(nearest, k, epsilon, num_centers, tol, zero, eager=...)``: :func:`_sharp_subset`, compiled."""


def soft_sweep_scores(patch_operand: torch.Tensor, center_operand: torch.Tensor, sweep: Sweep) -> Result:
    """Score reference mode (and sharp mode while tracing or exporting) in two sweeps over the images' block.

    The first computes every chunk's distances with what the search needs to start (row extremes and moments in
    reference mode, whose normaliser is image-wide; the :data:`SHARP_START_NEAREST` nearest in sharp mode); the
    starts are then computed for all rows at once; the second runs the search on each chunk with one pass per
    evaluation (:data:`~anomalib_adfa.scoring.kernels.weight_sums`), then the gradient pass and its matmul.
    """
    batch, num_patches, width = patch_operand.shape
    num_centers, topk, tol, eager = center_operand.shape[0], sweep.topk, sweep.tol, sweep.tol is not None
    bounds = chunk_bounds(num_patches, sweep.rows_per_chunk)
    # Eager CPU sweeps write their distances and gradients into kept memory (SweepMemory says why).
    memory = None
    if eager and patch_operand.device.type == "cpu":
        gradient_rows = min(sweep.rows_per_chunk, num_patches) if sweep.with_gradient else 0
        memory = sweep_memory.take((num_patches + gradient_rows) * batch * num_centers, patch_operand)

    def part_of_memory(offset: int, rows: int) -> torch.Tensor | None:
        return None if memory is None else memory[offset * num_centers : (offset + rows) * num_centers].view(rows, -1)

    distances, statistics = [], []
    if topk.mode == "reference":
        shift = patch_operand @ center_operand.mean(dim=0)  # the rows' mean squared distance, (B, T)
        shift = shift.clamp_min(0.0).add(EUCLIDEAN_EPS).sqrt() if sweep.euclidean else shift
    for a, b in bounds:
        rows = patch_operand[:, a:b].reshape(-1, width)
        chunk = operand_distances(rows, center_operand, sweep.euclidean, part_of_memory(batch * a, batch * (b - a)))
        if topk.mode == "reference":
            part = kernels.row_extremes(chunk, shift[:, a:b].reshape(-1, 1), eager=eager)
        else:
            part = smallest_distances(chunk, nearest_count(topk.k, num_centers, SHARP_START_NEAREST), eager)[0]
        distances.append(chunk)
        statistics.append(part.view(batch, b - a, -1))
    statistics = torch.cat(statistics, dim=1)
    if topk.mode == "reference":
        search = reference_search(statistics, shift, topk.k, topk.epsilon, num_centers, eager=eager)
    else:
        # The subset's residual carries over into the full rows' first evaluation: solve it well inside the tolerance.
        search = sharp_root(statistics, topk.k, topk.epsilon, num_centers, None if tol is None else tol / 16)[2]
    scores, directions = [], []
    for index, (a, b) in enumerate(bounds):
        # Copies, not views (a view is what reshape gives for one image per sweep): the compiled kernels would
        # compile a second graph for view arguments, whose guards cover their base.
        chunk, rows = distances[index], RowSearch(*(field[:, a:b].reshape(-1, 1).clone() for field in search))
        distances[index] = None  # freed as soon as its chunk is done, unless it lies in sweep_memory
        gradient = None
        if sweep.with_gradient:
            gradient = part_of_memory(batch * num_patches, chunk.shape[0])
            gradient = torch.empty_like(chunk) if gradient is None else gradient
        sums = search_chunk(chunk, rows, topk, tol, gradient, distance_zero(sweep.euclidean))
        scores.append(sums[:, 2].view(batch, b - a))
        if sweep.with_gradient:
            directions.append((gradient @ center_operand).view(batch, b - a, width))
    return torch.cat(scores, dim=1), torch.cat(directions, dim=1) if sweep.with_gradient else None


def mode_scores(patch_operand: torch.Tensor, center_operand: torch.Tensor, sweep: Sweep) -> Result:
    """Scores ``(B, T)`` and directions of one sweep of images, by the algorithm of the top-k mode."""
    if sweep.topk.mode == "hard":
        return hard_scores(patch_operand, center_operand, sweep)
    if sweep.topk.mode == "sharp" and sweep.tol is not None:
        return sharp_candidate_scores(patch_operand, center_operand, sweep)
    return soft_sweep_scores(patch_operand, center_operand, sweep)
