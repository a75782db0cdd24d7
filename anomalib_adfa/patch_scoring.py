r"""ADFA's patch scores :math:`s_t = Z_t^\top D(p_t, C)`, fused and chunked: distances, soft top-k, weighted sum.

This is the kernel the model runs in training and inference. It owns the patch-to-centre distances it
needs (the modes of :data:`DISTANCE_MODES`) and calls the operator of :mod:`anomalib_adfa.soft_topk` on
them without ever holding the ``(B, T, N)`` distance tensor whole.

Distances by one matmul
-----------------------
With :math:`\hat p = s\,[p, |p|^2, 1]` and :math:`\hat c = [-2c, 1, |c|^2]`,
:math:`\hat p \cdot \hat c = s\,(|p|^2 + |c|^2 - 2 p \cdot c)`: the squared distances of a chunk of
patch rows (scaled by a detached per-image factor ``s``) come from one matmul, the norms riding along
instead of costing two extra passes over the result. Conversely :math:`G \hat c = [-2 G c,\ G
\mathbf{1},\ G |c|^2]` gives both terms of the gradient with respect to the patches in one matmul,
:math:`\partial L / \partial p = s\,(G \hat c_{:D'} + 2 p \odot G \hat c_{D'})`.

Fused scores
------------
ADFA needs only :math:`s_t = \sum_j z_{tj} d_{tj}` per patch. :func:`nearest_center_scores` computes it
chunk by chunk of patch rows, an image (or as many as the cache holds) at a time:

- hard mode: one matmul per chunk, then its ``K`` smallest distances (:func:`smallest_distances`);
- sharp mode (eager): one matmul per chunk, then its :data:`SHARP_CANDIDATES` smallest distances, on which the
  threshold problem is solved alone wherever the centres left out provably carry no weight float32 can register
  (:func:`_sharp_candidates`; the other rows, rare, run the search below on their full distances);
- reference mode, and sharp mode while tracing or exporting, first sweep: one matmul per chunk and what the
  search needs to start (reference: row extremes and moments, since the normaliser is image-wide; sharp: the
  nearest distances); the starts (:func:`~anomalib_adfa.soft_topk.moment_start`,
  :func:`~anomalib_adfa.soft_topk.nearest_subset_start`) usually meet the tolerance at the first evaluation;
- second sweep: the threshold search of :func:`~anomalib_adfa.soft_topk.newton_threshold`, one pass of
  :mod:`anomalib_adfa.chunk_kernels` per evaluation returning every row sum the score and the gradient need
  (with a gradient, the first evaluation writes it as well); rows still outside the tolerance continue alone.

With a gradient, the forward also computes each row's gradient direction :math:`G \hat c` per unit of
upstream gradient, with :math:`\partial s / \partial d_j = z_j - b\, s_j (d_j - \bar d)` for logits
:math:`a - b d` (from the implicit gradient :func:`~anomalib_adfa.soft_topk.topk_weight_grad`; in hard and
eager sharp mode from the selected centre operands), while the chunk is in cache: each score depends on its
own patch only, so the backward pass is a row scaling of these directions, and no distances are kept for it.

Passes per chunk of the patch-by-centre block in a training step (counted by ``benchmarks/train_speed.py``):
reference mode 1 matmul, 1 extremes pass, 1 evaluation with the gradient (usually) and the gradient's matmul;
sharp and hard mode 1 matmul and 1 group-minima pass; the backward pass none.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_adfa import chunk_kernels
from anomalib_adfa.soft_topk import (
    SUBSET_SOLVER_STEPS,
    TopKMode,
    TopKSettings,
    default_tolerance,
    may_exit_early,
    moment_start,
    nearest_subset_start,
    newton_step,
    newton_threshold,
    reference_logit_map,
    sharp_logit_map,
)

DistanceMode = Literal["kl_weighted", "squared", "euclidean"]

DISTANCE_MODES: tuple[str, ...] = ("kl_weighted", "squared", "euclidean")


# Keeps the gradient of sqrt finite where a patch sits on a centre.
EUCLIDEAN_EPS = 1e-12


def check_distance(distance: str) -> None:
    """Raise a ValueError unless ``distance`` is one of :data:`DISTANCE_MODES`."""
    if distance not in DISTANCE_MODES:
        msg = f"distance must be one of {DISTANCE_MODES}, got {distance!r}"
        raise ValueError(msg)


def kl_weight(patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Per-image scalar of the public ADFA code: ``sum_t KL(softmax(c_t) || softmax(p_t))``, detached.

    Softmax runs over channels; ``c_t`` is the centre at the patch's own position ``t``.

    Args:
        patches: Descriptors, shape ``(B, T, D')``.
        centers: Centre bank, shape ``(T, D')`` (one centre per position).

    Returns:
        Weights of shape ``(B, 1, 1)``, without gradient.
    """
    with torch.no_grad():
        center_log_probs = centers.log_softmax(dim=-1)
        patch_log_probs = patches.log_softmax(dim=-1)
        divergence = center_log_probs.exp() * (center_log_probs - patch_log_probs)
        return divergence.sum(dim=(1, 2)).view(-1, 1, 1)


def patch_scale(distance: DistanceMode, patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor | None:
    """Detached per-image factor of the squared distances, ``(B, 1, 1)``, or ``None`` when the mode has none.

    Args:
        distance: ``"kl_weighted"`` (squared distances times :func:`kl_weight`, the public code), ``"squared"``,
            or ``"euclidean"`` (the square root of the squared distances, the paper's Eq. 4).
        patches: Descriptors, shape ``(B, T, D')``.
        centers: Centre bank, shape ``(T, D')``.
    """
    return kl_weight(patches, centers) if distance == "kl_weighted" else None


def distance_operands(
    patches: torch.Tensor, centers: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Operands whose product is the (scaled) squared distance matrix in a single matmul.

    With :math:`\hat p = s\,[p, |p|^2, 1]` and :math:`\hat c = [-2c, 1, |c|^2]`,
    :math:`\hat p \cdot \hat c = s\,(|p|^2 + |c|^2 - 2 p \cdot c)`: the norms ride along in the matmul
    instead of costing two extra passes over the ``(T, N)`` result, and the centre norms are computed
    once per call. Conversely :math:`G \hat c = [-2 G c,\ G \mathbf{1},\ G |c|^2]` gives both terms of
    the gradient with respect to the patches in one matmul.

    Args:
        patches: Descriptors, shape ``(B, T, D')``.
        centers: Centre bank, shape ``(N, D')``.
        scale: Optional positive per-image factor ``s``, shape ``(B, 1, 1)``.

    Returns:
        ``(B, T, D' + 2)`` patch operand and ``(N, D' + 2)`` centre operand.
    """
    patch_ones = patches.new_ones((*patches.shape[:-1], 1))
    patch_operand = torch.cat([patches, patches.square().sum(dim=-1, keepdim=True), patch_ones], dim=-1)
    if scale is not None:
        patch_operand = patch_operand * scale
    center_ones = centers.new_ones((centers.shape[0], 1))
    center_operand = torch.cat([-2.0 * centers, center_ones, centers.square().sum(dim=-1, keepdim=True)], dim=-1)
    return patch_operand, center_operand


def operand_distances(
    patch_operand: torch.Tensor, center_operand: torch.Tensor, euclidean: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Distances from the operands of :func:`distance_operands`, for a chunk of patches.

    The squared distances are returned as the matmul gives them, rounding below 0 included: every consumer
    clamps them at 0 inside its own pass (:mod:`anomalib_adfa.chunk_kernels`) instead of spending one on it.

    Args:
        patch_operand: Shape ``(..., D' + 2)``.
        center_operand: Shape ``(N, D' + 2)``.
        euclidean: Take the square root of the clamped squared distances (the ``"euclidean"`` mode).
        out: Optional contiguous ``(..., N)`` tensor to write the distances into.

    Returns:
        Distances ``(..., N)`` (``out`` when given).
    """
    distances = torch.matmul(patch_operand, center_operand.T, out=out)
    return distances.clamp_min_(0.0).add_(EUCLIDEAN_EPS).sqrt_() if euclidean else distances


# Elements of one chunk of the patch-by-centre matrix in exported graphs, per image (an exported graph must not
# depend on the machine that exported it). Eager runs size chunks to the cache (default_chunk_elements).
CHUNK_ELEMENTS = 1 << 20

# Nearest distances whose threshold problem starts the sharp mode's search (nearest_subset_start). On a Lite0
# BrainMRI batch the first evaluation of the full rows then met the tolerance on 99.9 % of rows (16: on all, at a
# costlier selection; K + 1 = 4: on under half, most others needing two or three more); _search_chunk carries the
# few others on alone.
SHARP_START_NEAREST = 8

# Nearest centres on which eager sharp mode solves each patch's threshold (_sharp_candidates). On a Lite0 BrainMRI
# batch at most 17 centres of a patch lay within 2.23 (d_(K+1) - d_(1)) of its nearest, where the weights fall
# below 2^-30 of K.
SHARP_CANDIDATES = 16

# Total weight that the centres left out of a sharp-mode row may carry for the row to be accepted, in units of
# the dtype's eps times K (below the rounding of the row's weight sum).
PRUNED_MASS_EPS = 1 / 16

# Assumed size of the last-level cache where the operating system does not report it.
DEFAULT_CACHE_BYTES = 32 << 20


@functools.cache
def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs), or :data:`DEFAULT_CACHE_BYTES` where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        multiplier = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * multiplier)
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def default_chunk_elements(dtype: torch.dtype) -> int:
    """Chunk size of eager runs: a sixth of the last-level cache (2 M float32 elements on a 48 MiB L3).

    A chunk, its weights and (written over them) its gradient then stay in cache with part of the image's
    distances. Measured on the 2-core Xeon (48 MiB L3) with ``benchmarks/train_speed.py``'s step, as a ratio to
    its floor: reference mode 1.16 at 2 M elements and 1.50 at 4 M with WR50 dimensions, 1.18 and 1.16 with
    Lite0's; sharp mode 1.20 and 1.28 (WR50), 1.68 and 1.82 (Lite0). Chunks of 1 M and less paid Python and
    dispatch overhead (Lite0 reference 1.70 at 1 M, 1.82 at 0.5 M), chunks of 8 M and more left the cache
    (1.62 at 8 M, 2.00 at 16 M).
    """
    return max(CHUNK_ELEMENTS // 4, last_level_cache_bytes() // (6 * torch.finfo(dtype).bits // 8))


class SweepMemory(threading.local):
    """Memory for the distance block of a soft-mode sweep and its gradient chunk, kept from one call to the next.

    A soft-mode sweep holds the distances of its images (sized to the last-level cache) and one gradient chunk at
    once. Allocated afresh in every call, glibc's allocator hands that memory back to the system when the call
    frees it (a free heap top beyond twice its largest recent allocation is trimmed), and the next call pays for
    it again in page faults: 10 to 120 thousand per Lite0 training step of ``benchmarks/train_speed.py`` on the
    project's Xeon, none in its floor. Eager CPU runs therefore take it from here; one buffer per thread, the
    largest yet asked for, is kept (at most the cache size plus one chunk).
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def take(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """Return a flat tensor of ``numel`` elements of ``like``'s dtype (its contents undefined)."""
        buffer = self.buffer
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            self.buffer = None  # the old one is freed before its successor is allocated
            self.buffer = buffer = like.new_empty(numel)
        return buffer[:numel]


sweep_memory = SweepMemory()


class Chunking(NamedTuple):
    """How the patch-by-centre block of a batch is traversed.

    Attributes:
        images_per_sweep: Images whose whole distance block is computed before their search runs; as many as
            fit the last-level cache (at least one), so that the second sweep of the soft modes reads from cache.
        rows_per_chunk: Patch rows per image in one chunk of the sweep.
    """

    images_per_sweep: int
    rows_per_chunk: int


def chunking_for(
    batch: int, num_patches: int, num_centers: int, dtype: torch.dtype, chunk_elements: int, batch_agnostic: bool
) -> Chunking:
    """Choose the :class:`Chunking` of a batch: chunks of about ``chunk_elements``, sweeps sized to the cache.

    A ``batch_agnostic`` traversal (for exported graphs, which take any batch size) sweeps the whole batch at
    once and sizes chunks per image.
    """
    if batch_agnostic:
        return Chunking(batch, max(1, chunk_elements // num_centers))
    block_bytes = num_patches * num_centers * torch.finfo(dtype).bits // 8
    images = max(1, min(batch, last_level_cache_bytes() // block_bytes))
    return Chunking(images, max(1, chunk_elements // (images * num_centers)))


def _sweeps(
    patch_operand: torch.Tensor,
    center_operand: torch.Tensor,
    topk: TopKSettings,
    euclidean: bool,
    chunking: Chunking,
    tol: float | None,
    with_gradient: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_score_forward` over the batch, :attr:`Chunking.images_per_sweep` images at a time."""
    # The whole batch is passed unsliced when it fits one sweep, so that a traced graph keeps its batch free.
    step = chunking.images_per_sweep
    groups = [patch_operand] if step >= patch_operand.shape[0] else patch_operand.split(step)
    parts = [
        _score_forward(group, center_operand, topk, euclidean, chunking.rows_per_chunk, tol, with_gradient)
        for group in groups
    ]
    if len(parts) == 1:
        return parts[0]
    scores = torch.cat([part[0] for part in parts])
    return scores, torch.cat([part[1] for part in parts]) if with_gradient else None


def selection_block(num_centers: int, count: int) -> int:
    """Group size of :func:`smallest_distances`: the largest divisor of ``N`` not above ``sqrt(N / count)``."""
    limit = math.isqrt(max(1, num_centers // count))
    return max(size for size in range(1, limit + 1) if num_centers % size == 0)


def smallest_distances(distances: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``count`` smallest clamped distances of each row, increasing, and their columns.

    ``torch.topk`` over a full row costs several passes; instead the columns are cut into ``N / m`` groups of
    ``m`` (:func:`selection_block`; group ``g`` holds the columns ``g, g + N/m, g + 2N/m, ...``, so that one
    vectorised pass takes every group's minimum), and ``topk`` runs on the group minima and then on the
    ``count`` groups with the smallest minima only. This is exact: an element among the ``count`` smallest of
    its row that lay in another group would be exceeded by at least ``count`` other elements, the minima of
    the chosen groups.

    Args:
        distances: Raw distances ``(R, N)``.
        count: Number of distances per row, at most ``N``.

    Returns:
        Values ``(R, count)`` and column indices ``(R, count)``.
    """
    num_centers = distances.shape[-1]
    size = selection_block(num_centers, count)
    if size == 1:
        values, indices = torch.topk(distances, count, dim=-1, largest=False)
        return values.clamp_min(0.0), indices
    groups = num_centers // size
    minima = chunk_kernels.group_minima(distances, size)
    # Unsorted selections and one sort of the result: torch.topk's sorted output costs twice as much for count 16.
    chosen = torch.topk(minima, count, dim=-1, largest=False, sorted=False).indices
    columns = (chosen.unsqueeze(-1) + groups * torch.arange(size, device=distances.device)).flatten(1)
    values, picked = torch.topk(distances.gather(1, columns), count, dim=-1, largest=False, sorted=False)
    values, order = values.sort(dim=-1)
    return values.clamp_min(0.0), columns.gather(1, picked.gather(1, order))


def selected_directions(chain: torch.Tensor, columns: torch.Tensor, center_operand: torch.Tensor) -> torch.Tensor:
    r"""Directions :math:`\sum_c \text{chain}_{rc}\, \hat c_{\text{columns}_{rc}}` of rows scored on a few centres.

    ``torch.nn.functional.embedding_bag`` sums the weighted centre operands per row without materialising the
    ``(R, C, D' + 2)`` gather (92 MB for a Lite0 batch in sharp mode, 0.9 GB with WR50 dimensions).

    Args:
        chain: Gradient of each row's score by its selected distances, ``(R, C)``.
        columns: The selected centres' indices, ``(R, C)``.
        center_operand: ``(N, D' + 2)``.

    Returns:
        ``(R, D' + 2)``.
    """
    return F.embedding_bag(columns, center_operand, mode="sum", per_sample_weights=chain)


class _Search(NamedTuple):
    """Per-row search of a soft mode for weights ``sigmoid(beta - slope * (d - shift))``; fields ``(B, T, 1)``."""

    slope: torch.Tensor
    shift: torch.Tensor
    start: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor


def _chunk_bounds(num_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows_per_chunk, num_rows)) for start in range(0, num_rows, rows_per_chunk)]


def _nearest_count(k: int, num_centers: int, wanted: int) -> int:
    """How many nearest distances a sharp-mode row keeps: ``wanted``, at least ``K + 1``, at most ``N``."""
    return min(num_centers, max(k + 1, wanted))


def _distance_zero(euclidean: bool) -> float:
    """Return the distance of a clamped squared distance: ``sqrt(EUCLIDEAN_EPS)`` if ``euclidean``, else 0."""
    return math.sqrt(EUCLIDEAN_EPS) if euclidean else 0.0


def _reference_search(statistics: torch.Tensor, shift: torch.Tensor, k: int, epsilon: float, n: int) -> _Search:
    """Search of the ``"reference"`` mode from the :data:`~anomalib_adfa.chunk_kernels.row_extremes` of every row.

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
    return _Search(slope, shift, torch.minimum(torch.maximum(start, lower), upper), lower, upper)


reference_search = chunk_kernels.ChunkKernel(_reference_search, min_elements=1 << 13)
"""``reference_search(statistics, shift, k, epsilon, n) -> _Search``: :func:`_reference_search`, compiled (its few
hundred operations on ``(B, T)`` columns cost about 3 ms per image as eager operators)."""


def _sharp_root(
    nearest: torch.Tensor, k: int, epsilon: float, n: int, tol: float | None
) -> tuple[torch.Tensor, torch.Tensor, _Search]:
    """Solve sharp mode on each row's nearest distances ``(..., m)``, increasing, alone.

    Returns:
        Their logits, the root of the threshold problem on them alone
        (:func:`~anomalib_adfa.soft_topk.nearest_subset_start`, to ``tol``), and the :class:`_Search` of the full
        rows of ``n`` distances from there (the root bounds the full one from above).
    """
    mapping = sharp_logit_map(nearest[..., : k + 1], k, epsilon)  # x = offset - slope * (d - shift)
    logits = mapping(nearest)
    start, upper = nearest_subset_start(logits, k, SUBSET_SOLVER_STEPS, tol)
    lower = math.log(k / (n - k)) + torch.zeros_like(start)  # at d = shift, the nearest distance
    offset = mapping.offset
    return logits, start, _Search(mapping.slope, mapping.shift, start + offset, lower + offset, upper + offset)


def _score_forward(
    patch_operand: torch.Tensor,
    center_operand: torch.Tensor,
    topk: TopKSettings,
    euclidean: bool,
    rows_per_chunk: int,
    tol: float | None,
    with_gradient: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Patch scores ``(B, T)`` chunk by chunk, and with ``with_gradient`` their gradient directions.

    The gradient directions are :math:`G \hat c` per unit of upstream gradient, ``(B, T, D' + 2)``: each row's
    score depends on its patch only, so the upstream gradient of the backward pass scales rows and the matmul
    with the centre operand can run here, on chunks still in cache, instead of on stored distances.

    Hard mode keeps the ``K`` smallest distances of each chunk (:func:`smallest_distances`). The soft modes
    make two sweeps: the first computes every chunk's distances with what the search needs to start (row
    extremes and moments in reference mode, whose normaliser is image-wide; the :data:`SHARP_START_NEAREST`
    nearest in sharp mode), the starts are then computed for all rows at once, and the second sweep runs the search of
    :func:`~anomalib_adfa.soft_topk.newton_threshold` on each chunk with one pass per evaluation
    (:data:`~anomalib_adfa.chunk_kernels.weight_sums`), then the gradient pass and its matmul.
    """
    batch, num_patches, width = patch_operand.shape
    num_centers = center_operand.shape[0]
    bounds = _chunk_bounds(num_patches, rows_per_chunk)
    zero = _distance_zero(euclidean)
    scores: list[torch.Tensor] = []
    directions: list[torch.Tensor] = []

    def chunk_distances(a: int, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return operand_distances(patch_operand[:, a:b].reshape(-1, width), center_operand, euclidean, out)

    if topk.mode == "hard":
        for a, b in bounds:
            values, indices = smallest_distances(chunk_distances(a, b), topk.k)
            scores.append(values.sum(dim=-1).view(batch, b - a))
            if with_gradient:
                chain = 0.5 / values if euclidean else torch.ones_like(values)
                chain = torch.where(values > zero, chain, 0.0)
                directions.append(selected_directions(chain, indices, center_operand).view(batch, b - a, width))
        return torch.cat(scores, dim=1), torch.cat(directions, dim=1) if with_gradient else None

    if topk.mode == "sharp" and may_exit_early():
        count = _nearest_count(topk.k, num_centers, SHARP_CANDIDATES)
        nearest, columns = [], []
        for a, b in bounds:
            values, indices = smallest_distances(chunk_distances(a, b), count)
            nearest.append(values.view(batch, b - a, count))
            columns.append(indices.view(batch, b - a, count))
        score, direction = _sharp_candidates(
            torch.cat(nearest, dim=1).flatten(0, 1),
            torch.cat(columns, dim=1).flatten(0, 1),
            patch_operand.flatten(0, 1),
            center_operand,
            topk,
            tol,
            with_gradient,
            euclidean,
        )
        return score.view(batch, num_patches), direction.view(batch, num_patches, width) if with_gradient else None

    # Eager CPU sweeps write their distances and gradients into kept memory (SweepMemory says why).
    memory = None
    if may_exit_early() and patch_operand.device.type == "cpu":
        gradient_rows = min(rows_per_chunk, num_patches) if with_gradient else 0
        memory = sweep_memory.take((num_patches + gradient_rows) * batch * num_centers, patch_operand)

    def part_of_memory(offset: int, rows: int) -> torch.Tensor | None:
        return None if memory is None else memory[offset * num_centers : (offset + rows) * num_centers].view(rows, -1)

    distances, statistics = [], []
    if topk.mode == "reference":
        shift = patch_operand @ center_operand.mean(dim=0)  # the rows' mean squared distance, (B, T)
        shift = shift.clamp_min(0.0).add(EUCLIDEAN_EPS).sqrt() if euclidean else shift
    for a, b in bounds:
        chunk = chunk_distances(a, b, part_of_memory(batch * a, batch * (b - a)))
        if topk.mode == "reference":
            part = chunk_kernels.row_extremes(chunk, shift[:, a:b].reshape(-1, 1))
        elif topk.mode == "sharp":
            part = smallest_distances(chunk, _nearest_count(topk.k, num_centers, SHARP_START_NEAREST))[0]
        else:
            msg = f"unknown top-k mode {topk.mode!r}"
            raise ValueError(msg)
        distances.append(chunk)
        statistics.append(part.view(batch, b - a, -1))
    statistics = torch.cat(statistics, dim=1)
    if topk.mode == "reference":
        search = reference_search(statistics, shift, topk.k, topk.epsilon, num_centers)
    else:
        # The subset's residual carries over into the full rows' first evaluation: solve it well inside the tolerance.
        search = _sharp_root(statistics, topk.k, topk.epsilon, num_centers, None if tol is None else tol / 16)[2]
    for index, (a, b) in enumerate(bounds):
        # Copies, not views (a view is what reshape gives for one image per sweep): the compiled kernels would
        # compile a second graph for view arguments, whose guards cover their base.
        chunk, rows = distances[index], _Search(*(field[:, a:b].reshape(-1, 1).clone() for field in search))
        distances[index] = None  # freed as soon as its chunk is done, unless it lies in sweep_memory
        gradient = None
        if with_gradient:
            gradient = part_of_memory(batch * num_patches, chunk.shape[0])
            gradient = torch.empty_like(chunk) if gradient is None else gradient
        sums = _search_chunk(chunk, rows, topk, tol, gradient, zero)
        scores.append(sums[:, 2].view(batch, b - a))
        if with_gradient:
            directions.append((gradient @ center_operand).view(batch, b - a, width))
    return torch.cat(scores, dim=1), torch.cat(directions, dim=1) if with_gradient else None


def _sharp_candidates(
    nearest: torch.Tensor,
    columns: torch.Tensor,
    patch_operand: torch.Tensor,
    center_operand: torch.Tensor,
    topk: TopKSettings,
    tol: float,
    with_gradient: bool,
    euclidean: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Sharp-mode scores ``(R,)`` and their directions from the ``C`` nearest distances ``(R, C)`` of each row alone.

    With logits :math:`x = a - b (d - d_{(1)})` spread by :math:`2 / \varepsilon` between the nearest and the
    ``(K+1)``-th nearest distance, the weights fall off exponentially with the distance: only a handful of
    centres per patch carry weight that float32 can register. The threshold problem is solved on the ``C``
    nearest alone (:func:`~anomalib_adfa.soft_topk.nearest_subset_start`, to the tolerance), and a row is
    accepted when the ``N - C`` centres left out, each of weight at most :math:`\sigma(x_{(C)} + \tau)`,
    carry at most :data:`PRUNED_MASS_EPS` of the dtype's eps times ``K`` together: then the full row's
    residual is within the tolerance too. Their share of the score is smaller still (:math:`z d` decreases
    beyond :math:`d_{(C)}`, as :math:`b\, d_{(C)} \ge 2 / \varepsilon > 1`), and so is their share of the
    gradient (``tests/test_patch_scoring.py`` compares both with the full rows). The rows not accepted (under
    1 % of a Lite0 BrainMRI batch) run the full search of :func:`_search_chunk` from the subset's root, which
    bounds the full one from above.

    The gradient directions come from the selected centre operands, as in hard mode. ``columns`` are the
    distances' centre indices and ``patch_operand`` ``(R, D' + 2)`` the rows' operands, from which the rows not
    accepted get their full distances back.
    """
    k, num_centers = topk.k, center_operand.shape[0]
    zero = _distance_zero(euclidean)
    scores, chain, accepted, search = sharp_subset(nearest, k, topk.epsilon, num_centers, tol, zero)
    directions = selected_directions(chain, columns, center_operand) if with_gradient else None
    if bool(accepted.all()):
        return scores, directions
    rows = (~accepted).squeeze(-1).nonzero().squeeze(-1)
    distances = operand_distances(patch_operand[rows], center_operand, euclidean)
    gradient = torch.empty_like(distances) if with_gradient else None
    sums = _search_chunk(distances, _Search(*(field[rows] for field in search)), topk, tol, gradient, zero)
    scores[rows] = sums[:, 2]
    if with_gradient:
        directions[rows] = gradient @ center_operand
    return scores, directions


def _sharp_subset(
    nearest: torch.Tensor, k: int, epsilon: float, num_centers: int, tol: float, zero: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Search]:
    """Solve :func:`_sharp_candidates`' rows on their ``C`` nearest distances ``(R, C)``; run as :data:`sharp_subset`.

    Returns:
        Scores ``(R,)``; the gradient of each score by the ``C`` distances ``(R, C)``, per unit of upstream
        gradient; whether each row is accepted ``(R, 1)``; and the :class:`_Search` (fields ``(R, 1)``) from which
        the rows not accepted continue on their full distances.
    """
    # Compiled, the subset's search runs its SUBSET_SOLVER_STEPS without the early exit (a handful of elements).
    logits, start, search = _sharp_root(nearest, k, epsilon, num_centers, tol)
    weights = torch.sigmoid(logits + start)
    left_out = (num_centers - nearest.shape[-1]) * torch.sigmoid(logits[:, -1:] + start)
    limit = PRUNED_MASS_EPS * torch.finfo(nearest.dtype).eps * k
    accepted = ((weights.sum(dim=-1, keepdim=True) - k).abs() <= tol * k) & (left_out <= limit)
    slopes = weights - weights * weights
    total = slopes.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(slopes.dtype).tiny)
    mean_distance = (slopes * nearest).sum(dim=-1, keepdim=True) / total
    chain = chunk_kernels.score_gradient(nearest, nearest, weights, slopes, search.slope, mean_distance, zero)
    return (weights * nearest).sum(dim=-1), chain, accepted, search


sharp_subset = chunk_kernels.ChunkKernel(_sharp_subset, min_elements=1 << 13)
"""``sharp_subset(nearest, k, epsilon, num_centers, tol, zero)``: :func:`_sharp_subset`, compiled."""


def _search_chunk(
    chunk: torch.Tensor,
    search: _Search,
    topk: TopKSettings,
    tol: float | None,
    gradient: torch.Tensor | None,
    zero: float,
) -> torch.Tensor:
    """Threshold search on the rows ``(R, N)`` of one chunk; returns the row sums ``(R, 4)`` of the last evaluation.

    With a ``gradient`` buffer ``(R, N)`` it is filled with :data:`~anomalib_adfa.chunk_kernels.sums_and_gradient`'s
    gradient at the final thresholds. In eager mode the first evaluation covers every row and computes the
    gradient too, on the chance (usual from the starts) that it meets the tolerance; only the rows it leaves outside
    continue, on a copy of their distances, with sums-only evaluations and a last pass for their gradient.
    """

    def rows_of(rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distances, slopes and shifts of all rows, or of ``rows`` (a copy of their distances)."""
        if rows is None:
            return chunk, search.slope, search.shift
        return chunk[rows], search.slope[rows], search.shift[rows]

    def evaluation(distances: torch.Tensor, slope: torch.Tensor, shift: torch.Tensor) -> Callable[..., tuple]:
        def sums_at(beta: torch.Tensor) -> tuple:
            sums = chunk_kernels.weight_sums(distances, beta, slope, shift)
            return sums[:, :1], sums[:, 1:2], sums

        return sums_at

    steps, k = topk.max_steps, topk.k
    if tol is None or not may_exit_early():
        every_row = evaluation(*rows_of(None))
        beta, sums = newton_threshold(every_row, k, search.start, search.lower, search.upper, steps, tol)
        if gradient is None:
            return sums
        return chunk_kernels.sums_and_gradient(chunk, beta, search.slope, search.shift, zero, gradient)
    if gradient is None:
        sums = chunk_kernels.weight_sums(chunk, search.start, search.slope, search.shift)
    else:
        sums = chunk_kernels.sums_and_gradient(chunk, search.start, search.slope, search.shift, zero, gradient)
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
    distances, slope, shift = rows_of(rows)
    beta, row_sums = newton_threshold(evaluation(distances, slope, shift), k, start, lower, upper, steps - 1, tol)
    if gradient is not None:
        row_gradient = gradient if rows is None else torch.empty_like(distances)
        row_sums = chunk_kernels.sums_and_gradient(distances, beta, slope, shift, zero, row_gradient)
        if rows is not None:
            gradient[rows] = row_gradient
    if rows is None:
        return row_sums
    sums[rows] = row_sums
    return sums


class _FusedScores(torch.autograd.Function):
    """Fused ``distances -> top-k weights -> weighted sum``; the backward pass scales the stored gradient directions."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        patches: torch.Tensor,
        centers: torch.Tensor,
        scale: torch.Tensor | None,
        topk: TopKSettings,
        euclidean: bool,
        chunking: Chunking,
        tol: float | None,
    ) -> torch.Tensor:  # type: ignore[override]
        patch_operand, center_operand = distance_operands(patches, centers, scale)
        scores, directions = _sweeps(patch_operand, center_operand, topk, euclidean, chunking, tol, True)
        ctx.save_for_backward(patches)
        ctx.scale, ctx.directions = scale, directions
        return scores

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_scores: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (patches,) = ctx.saved_tensors
        directions: torch.Tensor = ctx.directions
        channels = patches.shape[-1]
        # d = s (|p|^2 + |c|^2 - 2 p.c), so dL/dp = s g (G c_hat[:D'] + 2 p G c_hat[D']) (module docstring).
        norm_term = directions[..., channels : channels + 1]
        grad_patches = torch.addcmul(directions[..., :channels], patches, norm_term, value=2.0)
        grad_patches *= grad_scores.unsqueeze(-1)
        if ctx.scale is not None:
            grad_patches *= ctx.scale
        return grad_patches, None, None, None, None, None, None


def nearest_center_scores(
    patches: torch.Tensor,
    centers: torch.Tensor,
    distance: DistanceMode,
    topk: TopKSettings,
    chunk_elements: int | None = None,
    tol: float | None = None,
) -> torch.Tensor:
    r"""ADFA's patch scores :math:`s_t = Z_t^\top D(p_t, C)`, fused and chunked.

    Equal (values and gradients with respect to ``patches``) to the unfused
    :func:`anomalib_adfa.reference.plain_scores`, but it never holds more than one ``(B, T, N)`` tensor:
    the distances come from one matmul per chunk of patch rows, the threshold search runs on cache-sized
    chunks, and the backward pass recomputes the weights from the stored distances and one threshold per
    row, then returns the gradient in one more matmul per chunk. In hard mode only the ``K`` selected
    distances are kept. The centres get no gradient (they are a fixed bank).

    Args:
        patches: Descriptors, shape ``(B, T, D')``.
        centers: Centre bank, shape ``(N, D')``.
        distance: One of :data:`DISTANCE_MODES` (see :func:`patch_scale`).
        topk: Settings of the soft top-k (``K``, mode, epsilon, maximum solver steps).
        chunk_elements: Target number of elements of one ``(B, t, N)`` chunk; default
            :func:`default_chunk_elements`, and :data:`CHUNK_ELEMENTS` per image while tracing or exporting.
        tol: Relative tolerance of the threshold search's early exit; default
            :func:`default_tolerance` of the dtype. The exit is skipped while tracing or exporting.

    Returns:
        Scores of shape ``(B, T)``.
    """
    if centers.requires_grad:
        msg = "nearest_center_scores treats the centre bank as constant; detach the centres"
        raise ValueError(msg)
    tol = default_tolerance(patches.dtype) if tol is None else tol
    # An exported graph takes any batch size, so its chunks must not depend on it: there the budget is per image.
    batch, num_patches = patches.shape[:2]
    eager = may_exit_early()
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(patches.dtype) if eager else CHUNK_ELEMENTS
    chunking = chunking_for(batch, num_patches, centers.shape[0], patches.dtype, chunk_elements, not eager)
    check_distance(distance)
    scale = patch_scale(distance, patches, centers)
    euclidean = distance == "euclidean"
    if torch.is_grad_enabled() and patches.requires_grad:
        return _FusedScores.apply(patches, centers, scale, topk, euclidean, chunking, tol)
    patch_operand, center_operand = distance_operands(patches, centers, scale)
    return _sweeps(patch_operand, center_operand, topk, euclidean, chunking, tol, False)[0]


class PatchScorer(nn.Module):
    """The patch scores ADFA trains on and scores with: :func:`nearest_center_scores` with fixed settings.

    Args:
        num_nearest: ``K`` of the soft top-k.
        topk_mode: ``"reference"``, ``"sharp"`` or ``"hard"`` (see :mod:`anomalib_adfa.soft_topk`).
        ot_epsilon: Entropic regularisation of the soft top-k.
        distance: ``"kl_weighted"``, ``"squared"`` or ``"euclidean"`` (see :func:`patch_scale`).
        num_iterations: Maximum threshold-search steps; default: the mode's
            :data:`~anomalib_adfa.soft_topk.MAX_SOLVER_STEPS`.
    """

    def __init__(
        self,
        num_nearest: int = 3,
        topk_mode: TopKMode = "reference",
        ot_epsilon: float = 0.1,
        distance: DistanceMode = "kl_weighted",
        num_iterations: int | None = None,
    ) -> None:
        super().__init__()
        check_distance(distance)
        self.distance = distance
        self.topk = TopKSettings(num_nearest, topk_mode, ot_epsilon, num_iterations)

    def forward(self, patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Score every patch.

        Args:
            patches: Descriptors, shape ``(B, T, D')``.
            centers: Centre bank, shape ``(N, D')``, without gradient.

        Returns:
            Scores of shape ``(B, T)``.
        """
        return nearest_center_scores(patches, centers, self.distance, self.topk)

    def extra_repr(self) -> str:
        topk = self.topk
        return (
            f"distance={self.distance!r}, k={topk.k}, mode={topk.mode!r}, epsilon={topk.epsilon}, "
            f"num_iterations={topk.max_steps}"
        )
