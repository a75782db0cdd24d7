r"""Patch-to-centre distances of ADFA's three distance modes, from operands that make them one matmul.

Distances by one matmul
-----------------------
With :math:`\hat p = s\,[p, |p|^2, 1]` and :math:`\hat c = [-2c, 1, |c|^2]`,
:math:`\hat p \cdot \hat c = s\,(|p|^2 + |c|^2 - 2 p \cdot c)`: the squared distances of a chunk of
patch rows (scaled by a detached per-image factor ``s``, :func:`patch_scale`) come from one matmul, the
norms riding along instead of costing two extra passes over the result. Conversely :math:`G \hat c =
[-2 G c,\ G \mathbf{1},\ G |c|^2]` gives both terms of the gradient with respect to the patches in one
matmul, :math:`\partial L / \partial p = s\,(G \hat c_{:D'} + 2 p \odot G \hat c_{D'})`
(:func:`patch_gradient`).

Both backends take their distances from here: the plain one the whole ``(B, T, N)`` tensor
(:func:`dense_distances`, with autograd), the fused one chunk by chunk (:func:`operand_distances`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

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
    clamps them at 0 inside its own pass (:mod:`anomalib_adfa.scoring.kernels`) instead of spending one on it.

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


def distance_zero(euclidean: bool) -> float:
    """Return the distance of a clamped squared distance: ``sqrt(EUCLIDEAN_EPS)`` if ``euclidean``, else 0."""
    return math.sqrt(EUCLIDEAN_EPS) if euclidean else 0.0


def dense_distances(patches: torch.Tensor, centers: torch.Tensor, distance: DistanceMode) -> torch.Tensor:
    """Full distance tensor ``D(p_t, C)`` of one of the modes of :func:`patch_scale`, differentiable in ``patches``.

    Args:
        patches: Shape ``(B, T, D')``.
        centers: Shape ``(N, D')`` (``N == T`` for ``"kl_weighted"``).
        distance: One of :data:`DISTANCE_MODES`.

    Returns:
        Shape ``(B, T, N)``, clamped at 0 against rounding.
    """
    check_distance(distance)
    patch_operand, center_operand = distance_operands(patches, centers, patch_scale(distance, patches, centers))
    distances = operand_distances(patch_operand, center_operand, distance == "euclidean")
    return distances if distance == "euclidean" else distances.clamp_min(0.0)


def patch_gradient(
    directions: torch.Tensor, patches: torch.Tensor, grad_scores: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    r"""Gradient of the scores by the patches from each row's direction :math:`G \hat c` (module docstring).

    Args:
        directions: :math:`G \hat c` per unit of upstream gradient, ``(B, T, D' + 2)``.
        patches: ``(B, T, D')``.
        grad_scores: Upstream gradient of the scores, ``(B, T)``.
        scale: The per-image factor ``s`` ``(B, 1, 1)``, or ``None``.

    Returns:
        ``(B, T, D')``.
    """
    channels = patches.shape[-1]
    grad_patches = torch.addcmul(
        directions[..., :channels], patches, directions[..., channels : channels + 1], value=2.0
    )
    grad_patches *= grad_scores.unsqueeze(-1)
    return grad_patches if scale is None else grad_patches.mul_(scale)
