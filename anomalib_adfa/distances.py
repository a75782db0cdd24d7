"""Distances between patch descriptors and the bank of patch centres."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

DistanceMode = Literal["kl_weighted", "squared", "euclidean"]
DISTANCE_MODES: tuple[str, ...] = ("kl_weighted", "squared", "euclidean")

# Keeps the gradient of sqrt finite where a patch sits on a centre.
EUCLIDEAN_EPS = 1e-12


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


def distance_operands(
    patches: torch.Tensor, centers: torch.Tensor, patch_scale: torch.Tensor | None = None
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
        patch_scale: Optional positive per-image factor ``s``, shape ``(B, 1, 1)``.

    Returns:
        ``(B, T, D' + 2)`` patch operand and ``(N, D' + 2)`` centre operand.
    """
    patch_ones = patches.new_ones((*patches.shape[:-1], 1))
    patch_operand = torch.cat([patches, patches.square().sum(dim=-1, keepdim=True), patch_ones], dim=-1)
    if patch_scale is not None:
        patch_operand = patch_operand * patch_scale
    center_ones = centers.new_ones((centers.shape[0], 1))
    center_operand = torch.cat([-2.0 * centers, center_ones, centers.square().sum(dim=-1, keepdim=True)], dim=-1)
    return patch_operand, center_operand


def operand_distances(patch_operand: torch.Tensor, center_operand: torch.Tensor, euclidean: bool) -> torch.Tensor:
    """Distances from the operands of :func:`distance_operands`, for a chunk of patches.

    Args:
        patch_operand: Shape ``(B, t, D' + 2)``.
        center_operand: Shape ``(N, D' + 2)``.
        euclidean: Take the square root (as ``PatchCenterDistance("euclidean")``).

    Returns:
        Distances ``(B, t, N)``, clamped at 0 against rounding.
    """
    distances = torch.matmul(patch_operand, center_operand.T).clamp_min_(0.0)
    return distances.add_(EUCLIDEAN_EPS).sqrt_() if euclidean else distances


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


class PatchCenterDistance(nn.Module):
    """Distance of every patch to every centre, ``D(p_t, C)``.

    Args:
        mode: ``"kl_weighted"`` (squared distances times :func:`kl_weight`, the public code),
            ``"squared"``, or ``"euclidean"`` (the paper's Eq. 4).
    """

    def __init__(self, mode: DistanceMode = "kl_weighted") -> None:
        super().__init__()
        if mode not in DISTANCE_MODES:
            msg = f"distance must be one of {DISTANCE_MODES}, got {mode!r}"
            raise ValueError(msg)
        self.mode = mode

    def forward(self, patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Compute the distances.

        Args:
            patches: Shape ``(B, T, D')``.
            centers: Shape ``(N, D')`` with ``N == T``.

        Returns:
            Shape ``(B, T, N)``.
        """
        distances = squared_distances(patches, centers)
        if self.mode == "euclidean":
            return (distances + EUCLIDEAN_EPS).sqrt()
        if self.mode == "kl_weighted":
            return distances * kl_weight(patches, centers)
        return distances

    def patch_scale(self, patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor | None:
        """Detached per-image factor of the squared distances, ``(B, 1, 1)``, or ``None`` when there is none."""
        return kl_weight(patches, centers) if self.mode == "kl_weighted" else None

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
