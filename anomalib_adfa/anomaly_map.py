"""Anomaly map and image score of ADFA (the paper's Eq. 6)."""

from __future__ import annotations

import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn
from torch.nn import functional as F  # noqa: N812


class AnomalyMapGenerator(nn.Module):
    """Turn per-patch scores into a smoothed, input-sized anomaly map.

    Args:
        sigma: Standard deviation of the Gaussian blur, in input pixels.
        take_sqrt: Take the square root of the patch scores first (the public code does).
    """

    def __init__(self, sigma: float = 4.0, take_sqrt: bool = True) -> None:
        super().__init__()
        self.blur = GaussianBlur2d(sigma=sigma)
        self.take_sqrt = take_sqrt

    def forward(
        self, patch_scores: torch.Tensor, feature_size: tuple[int, int], image_size: tuple[int, int]
    ) -> torch.Tensor:
        """Build the map.

        Args:
            patch_scores: Shape ``(B, H*W)``.
            feature_size: ``(H, W)`` of the patch grid.
            image_size: ``(height, width)`` of the model input.

        Returns:
            Anomaly map of shape ``(B, 1, height, width)``.
        """
        scores = patch_scores.clamp_min(0.0).sqrt() if self.take_sqrt else patch_scores
        grid = scores.view(-1, 1, *feature_size)
        resized = F.interpolate(grid, size=image_size, mode="bilinear", align_corners=False)
        return self.blur(resized)
