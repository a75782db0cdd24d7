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
chunk by chunk of patch rows: one matmul gives a chunk's distances, the threshold search of
:func:`~anomalib_adfa.soft_topk.newton_threshold` runs on it while it is in cache, and the backward pass
recomputes the weights from the stored distances and one threshold per row
(:math:`\partial s / \partial d_j = z_j - b\, s_j (d_j - \bar d)` for logits :math:`a - b d`, from the
implicit gradient :func:`~anomalib_adfa.soft_topk.topk_weight_grad`) and returns the gradient with one
more matmul per chunk. In hard mode only the ``K`` selected distances are kept.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import nn

from anomalib_adfa.soft_topk import (
    TopKMode,
    TopKSettings,
    default_tolerance,
    may_exit_early,
    newton_threshold,
    reference_logit_map,
    sharp_logit_map,
    topk_weight_grad,
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


def operand_distances(patch_operand: torch.Tensor, center_operand: torch.Tensor, euclidean: bool) -> torch.Tensor:
    """Distances from the operands of :func:`distance_operands`, for a chunk of patches.

    Args:
        patch_operand: Shape ``(B, t, D' + 2)``.
        center_operand: Shape ``(N, D' + 2)``.
        euclidean: Take the square root (the ``"euclidean"`` mode).

    Returns:
        Distances ``(B, t, N)``, clamped at 0 against rounding.
    """
    distances = torch.matmul(patch_operand, center_operand.T).clamp_min_(0.0)
    return distances.add_(EUCLIDEAN_EPS).sqrt_() if euclidean else distances


# Elements of one chunk of the patch-by-centre matrix: small enough for the per-chunk passes of the
# threshold search to stay in cache, large enough for the Python overhead per chunk to vanish.
CHUNK_ELEMENTS = 1 << 20


class _ScoreState(NamedTuple):
    """What the backward pass of :class:`_FusedScores` needs, per chunk of patch rows.

    In the soft modes the weights of chunk ``i`` are ``sigmoid(betas[i] - slope * distances[i])``.
    """

    bounds: list[tuple[int, int]]
    distances: list[torch.Tensor]
    slope: torch.Tensor | None
    betas: list[torch.Tensor]
    clamped: list[bool]
    indices: torch.Tensor | None
    values: torch.Tensor | None


def _chunk_bounds(num_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows_per_chunk, num_rows)) for start in range(0, num_rows, rows_per_chunk)]


def _rows(value: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a per-row ``(B, T, 1)`` coefficient; per-image ``(B, 1, 1)`` ones are returned whole."""
    return value if value.shape[1] == 1 else value[:, start:stop]


def _chunk_weights(beta: torch.Tensor, distances: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    r"""Weights :math:`\sigma(\beta - b d)` of a chunk, with the argument floored at :math:`\log\sqrt{\text{tiny}}`.

    The floor changes weights below :math:`\sqrt{\text{tiny}}` (about 1e-19 in float32), far below the
    precision of any row sum, and keeps both the sigmoid off its slow overflow path and the squared
    weights of the Newton slope out of the subnormal range, which together slow the sharp mode's widely
    spread logits several-fold on CPU.
    """
    floor = 0.5 * math.log(torch.finfo(distances.dtype).tiny)
    return torch.addcmul(beta, distances, slope, value=-1.0).clamp_min_(floor).sigmoid_()


def _score_forward(
    patch_operand: torch.Tensor,
    center_operand: torch.Tensor,
    topk: TopKSettings,
    euclidean: bool,
    rows_per_chunk: int,
    tol: float | None,
) -> tuple[torch.Tensor, _ScoreState]:
    r"""Patch scores ``(B, T)`` chunk by chunk, and the state for the backward pass.

    The logits :math:`x = a - b (d - c)` of :class:`LogitMap` are never materialised: the search runs
    on :math:`\beta = \tau + a + b c`, so that every step costs one fused multiply-add and one sigmoid
    over the chunk, and the bracket and uniform start come from each row's extreme and mean distance.
    """
    bounds = _chunk_bounds(patch_operand.shape[1], rows_per_chunk)
    chunks = (operand_distances(patch_operand[:, a:b], center_operand, euclidean) for a, b in bounds)
    if topk.mode == "hard":
        values, indices = zip(*(torch.topk(chunk, topk.k, dim=-1, largest=False) for chunk in chunks), strict=True)
        values, indices = torch.cat(values, dim=1), torch.cat(indices, dim=1)
        return values.sum(dim=-1), _ScoreState(bounds, [], None, [], [], indices, values)
    distances = list(chunks)
    d_min = torch.cat([chunk.amin(dim=-1, keepdim=True) for chunk in distances], dim=1)
    d_max = torch.cat([chunk.amax(dim=-1, keepdim=True) for chunk in distances], dim=1)
    if topk.mode == "reference":
        mapping = reference_logit_map(d_min.amin(dim=1, keepdim=True), d_max.amax(dim=1, keepdim=True), topk.epsilon)
    elif topk.mode == "sharp":
        nearest = torch.cat([torch.topk(chunk, topk.k + 1, dim=-1, largest=False).values for chunk in distances], 1)
        mapping = sharp_logit_map(nearest, topk.k, topk.epsilon)
    else:
        msg = f"unknown top-k mode {topk.mode!r}"
        raise ValueError(msg)
    logit_ratio = math.log(topk.k / (center_operand.shape[0] - topk.k))
    slope = mapping.slope
    intercept = mapping.offset + mapping.shift * slope  # x = intercept - slope * d
    lower, upper = logit_ratio + slope * d_min, logit_ratio + slope * d_max
    scores, betas = [], []
    for (a, b), chunk in zip(bounds, distances, strict=True):
        row_slope = _rows(slope, a, b)
        if mapping.start is None:
            start = logit_ratio + row_slope * chunk.mean(dim=-1, keepdim=True)
        else:
            start = mapping.start[:, a:b] + _rows(intercept, a, b)
        beta, weights = newton_threshold(
            lambda beta, chunk=chunk, row_slope=row_slope: _chunk_weights(beta, chunk, row_slope),
            topk.k,
            start,
            lower[:, a:b],
            upper[:, a:b],
            topk.max_steps,
            tol,
        )
        scores.append((weights * chunk).sum(dim=-1))
        betas.append(beta)
    zero = math.sqrt(EUCLIDEAN_EPS) if euclidean else 0.0  # the distance of a clamped squared distance
    clamped = [bool((d_min[:, a:b] <= zero).any()) if may_exit_early() else True for a, b in bounds]
    return torch.cat(scores, dim=1), _ScoreState(bounds, distances, slope, betas, clamped, None, None)


def _chain_to_squared(
    grad_distances: torch.Tensor, distances: torch.Tensor, euclidean: bool, clamped: bool
) -> torch.Tensor:
    """Turn gradients by the distances into gradients by the clamped squared distances, in place."""
    if euclidean:
        grad_distances.mul_(0.5).div_(distances)
    if not clamped:
        return grad_distances
    return grad_distances.masked_fill_(distances <= (math.sqrt(EUCLIDEAN_EPS) if euclidean else 0.0), 0.0)


class _FusedScores(torch.autograd.Function):
    """Fused ``distances -> top-k weights -> weighted sum`` with a chunked, recomputing backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        patches: torch.Tensor,
        centers: torch.Tensor,
        scale: torch.Tensor | None,
        topk: TopKSettings,
        euclidean: bool,
        rows_per_chunk: int,
        tol: float | None,
    ) -> torch.Tensor:  # type: ignore[override]
        patch_operand, center_operand = distance_operands(patches, centers, scale)
        scores, state = _score_forward(patch_operand, center_operand, topk, euclidean, rows_per_chunk, tol)
        ctx.save_for_backward(patches)
        ctx.scale, ctx.center_operand, ctx.state, ctx.euclidean = scale, center_operand, state, euclidean
        return scores

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_scores: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (patches,) = ctx.saved_tensors
        state: _ScoreState = ctx.state
        center_operand: torch.Tensor = ctx.center_operand
        channels = patches.shape[-1]
        grad_patches = torch.empty_like(patches)
        for index, (a, b) in enumerate(state.bounds):
            row_grad = grad_scores[:, a:b, None]
            if state.indices is not None:
                grad_values = _chain_to_squared(
                    row_grad.expand_as(state.values[:, a:b]).clone(), state.values[:, a:b], ctx.euclidean, True
                )
                selected = center_operand[state.indices[:, a:b]]  # (B, t, K, D' + 2)
                projected = (grad_values.unsqueeze(-2) @ selected).squeeze(-2)
            else:
                # s = sum_j z_j d_j with x_j = intercept - slope * d_j: ds/dd_j = z_j - slope * (dz/dx)^T d.
                distances = state.distances[index]
                row_slope = _rows(state.slope, a, b)
                weights = _chunk_weights(state.betas[index], distances, row_slope)
                grad_distances = weights.addcmul_(topk_weight_grad(weights, distances), row_slope, value=-1.0)
                grad_distances = _chain_to_squared(
                    grad_distances.mul_(row_grad), distances, ctx.euclidean, state.clamped[index]
                )
                projected = grad_distances @ center_operand
            grad_patches[:, a:b] = projected[..., :channels] + 2.0 * patches[:, a:b] * projected[..., channels:-1]
        if ctx.scale is not None:
            grad_patches *= ctx.scale
        return grad_patches, None, None, None, None, None, None


def nearest_center_scores(
    patches: torch.Tensor,
    centers: torch.Tensor,
    distance: DistanceMode,
    topk: TopKSettings,
    chunk_elements: int = CHUNK_ELEMENTS,
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
        chunk_elements: Target number of elements of one ``(B, t, N)`` chunk.
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
    batch = patches.shape[0] if may_exit_early() else 1
    rows_per_chunk = max(1, chunk_elements // (batch * centers.shape[0]))
    check_distance(distance)
    scale = patch_scale(distance, patches, centers)
    euclidean = distance == "euclidean"
    if torch.is_grad_enabled() and patches.requires_grad:
        return _FusedScores.apply(patches, centers, scale, topk, euclidean, rows_per_chunk, tol)
    patch_operand, center_operand = distance_operands(patches, centers, scale)
    return _score_forward(patch_operand, center_operand, topk, euclidean, rows_per_chunk, tol)[0]


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
