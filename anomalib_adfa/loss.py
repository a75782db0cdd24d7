"""ADFA's training objective (the paper's Eq. 5)."""

from __future__ import annotations

import torch
from torch import nn


class AdfaLoss(nn.Module):
    """Mean over images and patches of ``Z_t^T D(p_t, C)``.

    The weighted distances are computed by :class:`~anomalib_adfa.torch_model.AdfaModel`, which
    already reduces each patch's weights and distances to one number, so the loss is their mean.
    """

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            patch_scores: ``Z_t^T D(p_t, C)`` for every patch, shape ``(B, T)``.

        Returns:
            Scalar loss.
        """
        return patch_scores.mean()
