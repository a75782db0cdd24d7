"""PyTorch model of ADFA: frozen backbone, patch descriptor, centre bank, soft top-k scores.

The eval-mode forward maps a pre-processed image batch to anomalib's
:class:`~anomalib.data.InferenceBatch`, with no data-dependent Python control flow, so the whole
module exports to ONNX and OpenVINO.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

from anomalib_adfa.anomaly_map import AnomalyMapGenerator
from anomalib_adfa.backbones import create_feature_extractor
from anomalib_adfa.descriptor import PUBLIC_ATTENTION_KERNEL, PatchDescriptor, pool_features
from anomalib_adfa.scoring import Backend, DistanceMode, PatchScorer, TopKMode


class CentersNotInitializedError(RuntimeError):
    """Raised when the model scores images before its centre bank was computed."""


class AdfaModel(DynamicBufferMixin, nn.Module):
    """ADFA as a plain PyTorch module.

    Args:
        backbone: timm model name of the frozen feature extractor.
        layers: Backbone layers whose outputs are concatenated (largest map first); ``None``: the
            stride-4/8/16 stages (:func:`~anomalib_adfa.backbones.stage_layers`; layer1-3 for WR50).
        pre_trained: Load ImageNet weights (from ``backbone_weights`` or timm's hub).
        backbone_weights: Optional local weights file for the backbone (offline use).
        gamma_d: Channel reduction ``D' = D // gamma_d``.
        attention_eps: Weight of the channel-attention branch; ``0`` disables it.
        attention_kernel: Kernel size of the attention conv (public code: 9) or ``"eca"``.
        num_nearest: ``K`` of the soft top-k.
        topk_mode: ``"reference"``, ``"sharp"`` or ``"hard"`` (see :mod:`anomalib_adfa.scoring.soft_topk`).
        ot_epsilon: Entropic regularisation of the soft top-k.
        distance: Distance variant (see :func:`~anomalib_adfa.scoring.distances.patch_scale`).
        score_sqrt: Take the square root of patch scores in the anomaly map (public code).
        sigma: Gaussian blur of the anomaly map, in input pixels.
        backend: Scoring backend, ``"auto"`` (fused on a CPU, plain elsewhere), ``"plain"`` or ``"fused"``
            (:class:`~anomalib_adfa.scoring.PatchScorer`); the same scores either way.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        gamma_d: int = 4,
        attention_eps: float = 0.1,
        attention_kernel: int | Literal["eca"] = PUBLIC_ATTENTION_KERNEL,
        num_nearest: int = 3,
        topk_mode: TopKMode = "reference",
        ot_epsilon: float = 0.1,
        distance: DistanceMode = "kl_weighted",
        score_sqrt: bool = True,
        sigma: float = 4.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.feature_extractor = create_feature_extractor(backbone, layers, pre_trained, backbone_weights)
        in_channels = sum(self.feature_extractor.channels)
        if gamma_d < 1 or in_channels // gamma_d < 1:
            msg = f"gamma_d must be in [1, {in_channels}] for {in_channels} backbone channels, got {gamma_d}"
            raise ValueError(msg)
        self.descriptor = PatchDescriptor(in_channels, in_channels // gamma_d, attention_eps, attention_kernel)
        self.scorer = PatchScorer(num_nearest, topk_mode, ot_epsilon, distance, backend=backend)
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma, take_sqrt=score_sqrt)
        self.centers: torch.Tensor
        self.register_buffer("centers", torch.empty(0))

    @property
    def descriptor_channels(self) -> int:
        """Number of descriptor channels ``D'``."""
        return self.descriptor.projection.out_channels

    @property
    def has_centers(self) -> bool:
        """Whether the centre bank has been computed (or loaded)."""
        return self.centers.numel() > 0

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen part of the model: backbone maps, each averaged over 3x3 neighbourhoods.

        Args:
            images: Pre-processed images, shape ``(B, 3, H_in, W_in)``.

        Returns:
            One map per layer, ``(B, C_l, H_l, W_l)``, at the layer's native resolution.
        """
        with torch.no_grad():
            return pool_features(list(self.feature_extractor(images).values()))

    def describe(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Trainable part: patch descriptors ``P``, shape ``(B, D', H, W)``."""
        return self.descriptor(features)

    def set_centers(self, centers: torch.Tensor) -> None:
        """Fix the centre bank.

        Args:
            centers: Mean training descriptor at every position, shape ``(H*W, D')``.
        """
        if centers.ndim != 2 or centers.shape[1] != self.descriptor_channels:
            msg = (
                f"centre bank must have shape (H*W, {self.descriptor_channels}) for this model, "
                f"got {tuple(centers.shape)}"
            )
            raise ValueError(msg)
        self.centers = centers.detach().to(self.centers.device, self.centers.dtype).contiguous()

    def patch_scores(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Per-patch score ``s_t = Z_t^T D(p_t, C)``.

        Args:
            descriptors: Shape ``(B, D', H, W)``.

        Returns:
            Scores of shape ``(B, H*W)``.
        """
        if not self.has_centers:
            msg = "ADFA's centre bank is empty: train the model (or load a trained checkpoint) before scoring images"
            raise CentersNotInitializedError(msg)
        patches = descriptors.flatten(2).transpose(1, 2)  # (B, T, D')
        if patches.shape[1] != self.centers.shape[0]:
            msg = (
                f"the image gives a {tuple(descriptors.shape[-2:])} patch grid ({patches.shape[1]} patches) but the "
                f"centre bank holds {self.centers.shape[0]} centres: use the input size the model was trained with"
            )
            raise ValueError(msg)
        return self.scorer(patches, self.centers)

    def forward(
        self, images: torch.Tensor, features: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor | InferenceBatch:
        """Score images: what training (through :class:`~anomalib_adfa.loss.AdfaLoss`) and inference both run.

        Args:
            images: Pre-processed images, shape ``(B, 3, H_in, W_in)``.
            features: The images' frozen features (:meth:`extract_features`), e.g. from the training
                feature cache; ``None`` computes them.

        Returns:
            In training mode, the patch scores ``(B, H*W)`` (the loss is their mean). In eval mode, an
            :class:`~anomalib.data.InferenceBatch` with ``pred_score`` ``(B,)`` (maximum of the map) and
            ``anomaly_map`` ``(B, 1, H_in, W_in)``.
        """
        if features is None:
            features = self.extract_features(images)
        descriptors = self.describe(features)
        scores = self.patch_scores(descriptors)
        if self.training:
            return scores
        anomaly_map = self.anomaly_map_generator(scores, descriptors.shape[-2:], images.shape[-2:])
        return InferenceBatch(pred_score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)
