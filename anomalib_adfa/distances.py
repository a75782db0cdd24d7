"""Distances between patch descriptors and the bank of patch centres."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

DistanceMode = Literal["kl_weighted", "squared", "euclidean"]
DISTANCE_MODES: tuple[str, ...] = ("kl_weighted", "squared", "euclidean")


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
            # The epsilon keeps the gradient of sqrt finite where a patch sits on a centre.
            return (distances + 1e-12).sqrt()
        if self.mode == "kl_weighted":
            return distances * kl_weight(patches, centers)
        return distances

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
