"""Patch descriptor: multi-scale frozen features -> coordinates -> 1x1 conv -> channel attention."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

# Kernel size of the attention's 1-D convolution in the public ADFA code.
PUBLIC_ATTENTION_KERNEL = 9


def eca_kernel_size(channels: int, gamma: int = 2, beta: int = 1) -> int:
    """Adaptive kernel size of ECA-Net: ``t = int((log2(C) + beta) / gamma)``, made odd.

    Args:
        channels: Number of channels ``C`` the attention runs over.
        gamma: ECA's ``gamma``.
        beta: ECA's ``b``.

    Returns:
        ``t`` if it is odd, else ``t + 1`` (5 for 448 channels).
    """
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


def coordinate_channels(batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Row and column coordinates scaled linearly to ``[-1, 1]``.

    Args:
        batch: Batch size ``B``.
        height: Map height ``H``.
        width: Map width ``W``.
        like: Tensor whose dtype and device the result takes.

    Returns:
        Tensor of shape ``(B, 2, H, W)``: channel 0 is the row, channel 1 the column coordinate.
    """
    rows = torch.linspace(-1.0, 1.0, height, dtype=like.dtype, device=like.device)
    cols = torch.linspace(-1.0, 1.0, width, dtype=like.dtype, device=like.device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


class ChannelAttention(nn.Module):
    """ECA-style channel attention on global max and average pooled descriptors.

    ``A = sigmoid(conv1d(maxpool(x)) + conv1d(avgpool(x)))`` with one shared, bias-free 1-D
    convolution over the channel axis.

    Args:
        channels: Number of channels ``C``.
        kernel_size: Odd kernel size of the 1-D convolution.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            msg = f"the attention kernel size must be a positive odd number, got {kernel_size}"
            raise ValueError(msg)
        self.channels = channels
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Compute the attention weights.

        Args:
            features: Shape ``(B, C, H, W)``.

        Returns:
            Attention ``A`` of shape ``(B, C, 1, 1)`` in ``(0, 1)``.
        """
        pooled = torch.cat([features.amax(dim=(2, 3)), features.mean(dim=(2, 3))])  # (2B, C)
        responses = self.conv(pooled.unsqueeze(1)).squeeze(1)  # (2B, C)
        batch = features.shape[0]
        return torch.sigmoid(responses[:batch] + responses[batch:])[..., None, None]


class PatchDescriptor(nn.Module):
    """ADFA's trainable descriptor ``P = Pd + eps * (A * Pd)``.

    ``Pd`` is a 1x1 convolution of the concatenated multi-scale features and two coordinate
    channels; ``A`` is :class:`ChannelAttention` of ``Pd``.

    Args:
        in_channels: Channels of the concatenated backbone features ``D``.
        out_channels: Descriptor channels ``D'``.
        attention_eps: Weight ``eps`` of the attention branch; ``0`` disables it.
        attention_kernel: Kernel size of the attention's 1-D conv, or ``"eca"`` for ECA's adaptive rule.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        attention_eps: float = 0.1,
        attention_kernel: int | Literal["eca"] = PUBLIC_ATTENTION_KERNEL,
    ) -> None:
        super().__init__()
        kernel_size = eca_kernel_size(out_channels) if attention_kernel == "eca" else int(attention_kernel)
        self.projection = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)
        self.attention = ChannelAttention(out_channels, kernel_size)
        self.attention_eps = attention_eps

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Describe every patch.

        Args:
            features: Pooled backbone maps, each ``(B, C_l, H_l, W_l)``; the first is the largest.

        Returns:
            Descriptors ``P`` of shape ``(B, D', H, W)`` with ``(H, W)`` of the first map.
        """
        return self.attend(self.project(features))

    def project(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``Pd``: the 1x1 projection of the concatenated maps and coordinates, computed map by map.

        Equal to ``projection(cat(concatenate_scales(features), coordinates))`` but cheaper: a 1x1
        convolution commutes with bilinear resizing (both are linear and the resizing weights of every
        output pixel sum to one), so each map is projected at its native resolution and only the
        ``D'``-channel projections are resized and summed.

        Args:
            features: Pooled backbone maps, each ``(B, C_l, H_l, W_l)``; the first is the largest.

        Returns:
            Projected descriptors of shape ``(B, D', H_0, W_0)``.
        """
        weights = self.projection.weight.split([feature.shape[1] for feature in features] + [2], dim=1)
        height, width = features[0].shape[-2:]
        coordinates = coordinate_channels(1, height, width, features[0])
        projected = F.conv2d(coordinates, weights[-1], self.projection.bias)
        for feature, weight in zip(features, weights, strict=False):
            part = F.conv2d(feature, weight)
            if part.shape[-2:] != (height, width):
                part = F.interpolate(part, size=(height, width), mode="bilinear", align_corners=False)
            projected = projected + part
        return projected

    def attend(self, projected: torch.Tensor) -> torch.Tensor:
        """Apply the attention branch to projected descriptors ``Pd``, shape ``(B, D', H, W)`` (same shape out)."""
        if self.attention_eps == 0:
            return projected
        return projected + self.attention_eps * self.attention(projected) * projected


def pool_features(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Average each backbone map over its 3x3 neighbourhood (stride 1, zero padding counted).

    Args:
        features: Backbone maps, each ``(B, C_l, H_l, W_l)``.

    Returns:
        Maps of unchanged shapes.
    """
    return [F.avg_pool2d(feature, kernel_size=3, stride=1, padding=1) for feature in features]


def concatenate_scales(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Bilinearly resize every map to the first (largest) one and concatenate along channels.

    This is the paper's definition of the descriptor's input; :meth:`PatchDescriptor.project` computes its
    projection without materialising it (the tests check the two agree).

    Args:
        features: Maps, each ``(B, C_l, H_l, W_l)``.

    Returns:
        Tensor of shape ``(B, sum C_l, H_0, W_0)``.
    """
    size = features[0].shape[-2:]
    resized = [features[0]] + [
        F.interpolate(feature, size=size, mode="bilinear", align_corners=False) for feature in features[1:]
    ]
    return torch.cat(resized, dim=1)
