r"""Plain, unfused forms of ADFA's distances, soft top-k and patch scores, to check the fused kernel against.

The model never imports this module: it runs :func:`anomalib_adfa.patch_scoring.nearest_center_scores`.
Here every step materialises its full tensor, as the formulas read: the ``(B, T, N)`` distances by the
norm expansion, the soft top-k weights of the closed form (:mod:`anomalib_adfa.soft_topk`) with their
implicit-function backward, and the weighted sum. The tests compare these against an independent
Sinkhorn solver and against the fused kernel; ``benchmarks/train_speed.py`` times them as the naive
implementation.
"""

from __future__ import annotations

import functools
import math

import torch

from anomalib_adfa.patch_scoring import EUCLIDEAN_EPS, DistanceMode, check_distance, kl_weight
from anomalib_adfa.soft_topk import (
    LogitMap,
    TopKMode,
    TopKSettings,
    newton_threshold,
    reference_logit_map,
    sharp_logit_map,
    sigmoid_sums,
    topk_weight_grad,
)


def squared_distances(patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances by the expansion ``|p|^2 + |c|^2 - 2 p.c`` (one matmul).

    Args:
        patches: Descriptors, shape ``(B, T, D')``.
        centers: Centre bank, shape ``(N, D')``.

    Returns:
        Distances of shape ``(B, T, N)``, clamped at 0 against rounding.
    """
    patch_norms = patches.square().sum(dim=-1, keepdim=True)
    center_norms = centers.square().sum(dim=-1)
    return torch.baddbmm(
        (patch_norms + center_norms).contiguous(), patches, centers.T.expand(patches.shape[0], -1, -1), alpha=-2.0
    ).clamp_min(0.0)


def plain_distances(patches: torch.Tensor, centers: torch.Tensor, distance: DistanceMode) -> torch.Tensor:
    """Full distance tensor ``D(p_t, C)`` of one of the modes of :func:`anomalib_adfa.patch_scoring.patch_scale`.

    Args:
        patches: Shape ``(B, T, D')``.
        centers: Shape ``(N, D')`` with ``N == T``.
        distance: ``"kl_weighted"``, ``"squared"`` or ``"euclidean"``.

    Returns:
        Shape ``(B, T, N)``.
    """
    check_distance(distance)
    distances = squared_distances(patches, centers)
    if distance == "euclidean":
        return (distances + EUCLIDEAN_EPS).sqrt()
    if distance == "kl_weighted":
        return distances * kl_weight(patches, centers)
    return distances


def threshold_bracket(logits: torch.Tensor, k: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    r"""Return :math:`\operatorname{logit}(k/n)` and the bracket of :math:`\tau`, each ``(..., 1)``."""
    n = logits.shape[-1]
    if not 0 < k < n:
        msg = f"soft top-k needs 0 < k < n, got k={k} for n={n} elements"
        raise ValueError(msg)
    logit_ratio = math.log(k / (n - k))
    return logit_ratio, logit_ratio - logits.amax(dim=-1, keepdim=True), logit_ratio - logits.amin(dim=-1, keepdim=True)


def solve_threshold(
    logits: torch.Tensor,
    k: int,
    num_iterations: int = 8,
    tol: float | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Find :math:`\tau` with :math:`\sum_i \sigma(\tau + x_i) = k` along the last dimension.

    Safeguarded Newton (:func:`~anomalib_adfa.soft_topk.newton_threshold`) inside the bracket derived in
    :mod:`anomalib_adfa.soft_topk`. The loop has a fixed length unless ``tol`` is given, in which case it
    stops early once :math:`\max |F| \le tol \cdot k` (a data-dependent exit, skipped while tracing or
    exporting).

    Args:
        logits: Scores :math:`x`, shape ``(..., n)``.
        k: Number of selected elements, ``0 < k < n``.
        num_iterations: Maximum number of Newton/bisection steps.
        tol: Optional relative tolerance on :math:`F` for an early exit.
        start: Optional first iterate ``(..., 1)``; default: the uniform solution
            :math:`\operatorname{logit}(k/n) - \bar{x}`.

    Returns:
        Thresholds :math:`\tau`, shape ``(..., 1)``.
    """
    return _solve(logits, k, num_iterations, tol, start)[0]


def _solve(
    logits: torch.Tensor, k: int, num_iterations: int, tol: float | None, start: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold and weights; see :func:`solve_threshold`."""
    logit_ratio, lower, upper = threshold_bracket(logits, k)
    tau = logit_ratio - logits.mean(dim=-1, keepdim=True) if start is None else start
    return newton_threshold(functools.partial(sigmoid_sums, logits), k, tau, lower, upper, num_iterations, tol)


class _SoftTopKFunction(torch.autograd.Function):
    """Soft top-k weights with the implicit-function-theorem backward derived in :mod:`anomalib_adfa.soft_topk`."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        k: int,
        num_iterations: int,
        tol: float | None,
        start: torch.Tensor | None,
    ) -> torch.Tensor:  # type: ignore[override]
        weights = _solve(logits.detach(), k, num_iterations, tol, start)[1]
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_weights: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (weights,) = ctx.saved_tensors
        return topk_weight_grad(weights, grad_weights), None, None, None, None


def soft_topk(
    logits: torch.Tensor,
    k: int,
    num_iterations: int = 8,
    tol: float | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Soft top-k weights :math:`z_i = \sigma(\tau + x_i)` summing to ``k`` along the last dimension.

    This is exactly :math:`n \Gamma^\star_{\cdot 0}` of the two-anchor entropic OT problem with
    :math:`x_i = (C_{i1} - C_{i0}) / \varepsilon` (:mod:`anomalib_adfa.soft_topk`). Larger logits get larger
    weights.

    Args:
        logits: Scores :math:`x`, shape ``(..., n)``.
        k: Number of selected elements.
        num_iterations: Maximum number of solver steps.
        tol: Optional relative tolerance for an early exit (eager mode only).
        start: Optional first iterate of the threshold, ``(..., 1)`` (treated as a constant).

    Returns:
        Weights in ``(0, 1)``, shape ``(..., n)``, each row summing to ``k``.
    """
    start = None if start is None else start.detach()
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SoftTopKFunction.apply(logits, k, num_iterations, tol, start)
    return _solve(logits, k, num_iterations, tol, start)[1]


def logit_map(distances: torch.Tensor, mode: TopKMode, k: int, epsilon: float) -> LogitMap:
    """Logit map of a soft mode for a full ``(B, T, N)`` distance tensor (see :func:`selection_logits`)."""
    distances = distances.detach()
    if mode == "reference":
        return reference_logit_map(
            distances.amin(dim=(1, 2), keepdim=True), distances.amax(dim=(1, 2), keepdim=True), epsilon
        )
    if mode == "sharp":
        return sharp_logit_map(torch.topk(distances, k + 1, dim=-1, largest=False).values, k, epsilon)
    msg = f"selection_logits has no soft form for mode {mode!r}"
    raise ValueError(msg)


def selection_logits(distances: torch.Tensor, mode: TopKMode, k: int, epsilon: float) -> torch.Tensor:
    r"""Turn distances into soft top-k logits that favour the ``k`` smallest distances.

    Both soft modes use the OT cost :math:`(d - a)^2 / M` with anchors ``a`` in ``{0, 1}``, so
    :math:`x = (1 - 2 d) / (M \varepsilon)`; they differ only in the detached normaliser ``M``:

    - ``"reference"``: the largest cost of the image, :math:`M = \max_{t,i,a} (d_{ti} - a)^2`
      (Xie et al.'s normalisation, taken per image instead of per batch so that an image's score
      does not depend on its batch mates). With ADFA's distances this makes the weights almost
      uniform.
    - ``"sharp"``: a per-patch scale, distances shifted and divided by the gap between the
      nearest and the ``(k+1)``-th nearest centre, :math:`\tilde d = (d - d_{(1)}) / (d_{(k+1)} - d_{(1)})`
      with :math:`M = 1`, so the temperature follows each patch's own neighbourhood and the weights
      concentrate on the ``k`` nearest centres.

    Args:
        distances: Non-negative distances, shape ``(B, T, N)`` (images, patches, centres).
        mode: ``"reference"`` or ``"sharp"``.
        k: Number of nearest centres.
        epsilon: Entropic regularisation of the OT problem.

    Returns:
        Logits of shape ``(B, T, N)``.
    """
    return logit_map(distances, mode, k, epsilon)(distances)


def hard_topk(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Return 0/1 weights that mark the ``k`` smallest distances along the last dimension.

    Args:
        distances: Shape ``(..., n)``.
        k: Number of selected elements.

    Returns:
        0/1 weights of the same shape and dtype, constant with respect to ``distances``.
    """
    indices = torch.topk(distances.detach(), k, dim=-1, largest=False).indices
    return torch.zeros_like(distances).scatter_(-1, indices, 1.0)


def topk_weights(distances: torch.Tensor, topk: TopKSettings) -> torch.Tensor:
    """Nearest-centre weights ``Z`` of a full distance tensor: soft (reference/sharp OT) or hard top-k.

    Args:
        distances: Shape ``(B, T, N)``: distance of each patch to each centre.
        topk: Settings of the operator.

    Returns:
        Weights of shape ``(B, T, N)``; each ``(b, t)`` row sums to ``K``.
    """
    if topk.mode == "hard":
        return hard_topk(distances, topk.k)
    to_logits = logit_map(distances, topk.mode, topk.k, topk.epsilon)
    return soft_topk(to_logits(distances), topk.k, topk.max_steps, start=to_logits.start)


def plain_scores(
    patches: torch.Tensor, centers: torch.Tensor, distance: DistanceMode, topk: TopKSettings
) -> torch.Tensor:
    """Patch scores ``(B, T)``: full distance tensor, weights, weighted sum (autograd through all of it)."""
    distances = plain_distances(patches, centers, distance)
    return (topk_weights(distances, topk) * distances).sum(dim=-1)
