"""Frozen timm CNN backbones: the feature stages ADFA uses and the input normalisation their weights expect.

ADFA only needs a frozen ImageNet CNN that returns a few intermediate feature maps. This module builds such a
backbone from timm; where its weights come from (a local file, the packaged Lite0 weights, the hub cache) is
:mod:`anomalib_adfa.weights`.

Example:
    >>> from anomalib_adfa.backbones import create_feature_extractor
    >>> extractor = create_feature_extractor("tf_efficientnet_lite0", weights="packaged")
    >>> extractor.layers, extractor.channels, extractor.strides
    (('blocks.1', 'blocks.2', 'blocks.4'), (24, 40, 112), (4, 8, 16))
"""

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from anomalib_adfa.weights import meta_model, pretrained_model

# The stride-4/8/16 stages of EfficientNet-Lite0, what ``layers=None`` picks for it (see :func:`stage_layers`).
LITE0_LAYERS = ("blocks.1", "blocks.2", "blocks.4")
# Strides of the stages ADFA concatenates by default: WR50's layer1-3 in the paper.
DEFAULT_STRIDES = (4, 8, 16)


class FrozenFeatureExtractor(nn.Module):
    """A frozen timm ``features_only`` backbone that returns the selected feature maps by layer name.

    The wrapped model is always in eval mode with ``requires_grad=False``: calling ``train()`` on this module (as
    Lightning does at the start of every epoch) does not switch BatchNorm layers to training statistics.

    Args:
        model: timm ``features_only`` model whose outputs are the selected layers, shallow to deep.
        layers: Names of the selected layers, in the order the model returns them.
        channels: Channel count of each selected layer.
        strides: Spatial reduction of each selected layer relative to the input.

    Attributes:
        model (nn.Module): The frozen timm model.
        layers (tuple[str, ...]): Selected layer names, shallow to deep.
        channels (tuple[int, ...]): Channel count per selected layer.
        strides (tuple[int, ...]): Stride (input size / feature map size) per selected layer.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[str], channels: Sequence[int], strides: Sequence[int]
    ) -> None:
        super().__init__()
        self.model = model
        self.layers = tuple(layers)
        self.channels = tuple(int(c) for c in channels)
        self.strides = tuple(int(s) for s in strides)
        self.model.requires_grad_(requires_grad=False)
        self.train(mode=False)

    def train(self, mode: bool = True) -> "FrozenFeatureExtractor":
        """Keep the backbone in eval mode whatever ``mode`` is requested.

        Args:
            mode: Ignored; the backbone is frozen.

        Returns:
            This module, in eval mode.
        """
        return super().train(mode=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extract the selected feature maps.

        Args:
            images: Normalised input batch of shape ``(B, 3, H, W)``.

        Returns:
            Mapping from layer name to features of shape ``(B, C_l, H / s_l, W / s_l)``, where ``C_l`` and ``s_l`` are
            the layer's entries in :attr:`channels` and :attr:`strides` (sizes rounded up for odd inputs).
        """
        return dict(zip(self.layers, self.model(images), strict=True))


def backbone_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel input mean and std a timm backbone's pretrained weights expect.

    The values come from timm's registered pretrained config, so no download is needed. Backbones without a config
    entry for mean/std fall back to the ImageNet statistics.

    Args:
        backbone: timm model name, optionally with a pretrained tag (e.g. ``"resnet50.a1_in1k"``).

    Returns:
        ``(mean, std)``, each a tuple of 3 floats for RGB inputs scaled to ``[0, 1]``.

    Raises:
        ValueError: If timm does not know ``backbone``.
    """
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        msg = f"Unknown timm backbone '{backbone}': timm has no pretrained config for it (see timm.list_models())."
        raise ValueError(msg)
    mean = tuple(float(v) for v in (cfg.mean or IMAGENET_DEFAULT_MEAN))
    std = tuple(float(v) for v in (cfg.std or IMAGENET_DEFAULT_STD))
    return mean, std


NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
"""Named input normalisations (``mean``, ``std``) of ADFA's ``input_normalization`` setting."""


def input_normalization_statistics(name: str | None, backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the ``(mean, std)`` an ``input_normalization`` setting stands for.

    Args:
        name: A key of :data:`NORMALIZATIONS`, or ``None`` for the backbone's own statistics.
        backbone: timm name of the backbone.

    Returns:
        ``(mean, std)``, each 3 floats.
    """
    if name is None:
        return backbone_normalization(backbone)
    if name not in NORMALIZATIONS:
        msg = f"input_normalization must be one of {sorted(NORMALIZATIONS)} or None, got {name!r}"
        raise ValueError(msg)
    return NORMALIZATIONS[name]


def stage_layers(backbone: str, strides: Sequence[int] = DEFAULT_STRIDES) -> tuple[str, ...]:
    """Names of the backbone's feature stages at the given strides, from timm's ``feature_info``.

    Where timm lists several stages at one stride, the deepest is taken. For ``wide_resnet50_2`` this gives
    ``("layer1", "layer2", "layer3")``, for ``tf_efficientnet_lite0`` :data:`LITE0_LAYERS`.

    Args:
        backbone: timm model name.
        strides: Reductions of the wanted stages relative to the input, shallow to deep.

    Returns:
        One timm module name per stride.

    Raises:
        ValueError: If timm does not know ``backbone`` or it has no stage at one of the strides.
    """
    try:
        model = meta_model(backbone)
    except RuntimeError as err:  # timm's "Unknown model"
        msg = f"Unknown timm backbone '{backbone}': {err}"
        raise ValueError(msg) from err
    by_stride = {info["reduction"]: info["module"] for info in model.feature_info}  # later (deeper) entries win
    missing = [stride for stride in strides if stride not in by_stride]
    if missing:
        stages = [(info["module"], info["reduction"]) for info in model.feature_info]
        msg = (
            f"Backbone '{backbone}' has no feature stage at stride(s) {missing} (its stages and strides: {stages}); "
            "pass the layers to use explicitly"
        )
        raise ValueError(msg)
    return tuple(by_stride[stride] for stride in strides)


def _layer_indices(backbone: str, layers: Sequence[str], model: nn.Module) -> list[int]:
    available = [info["module"] for info in model.feature_info]
    if not layers:
        msg = f"No layers selected for backbone '{backbone}'. Available layers: {available}"
        raise ValueError(msg)
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        msg = f"Unknown layer(s) {unknown} for backbone '{backbone}'. Available layers: {available}"
        raise ValueError(msg)
    indices = [available.index(layer) for layer in layers]
    if indices != sorted(set(indices)):
        msg = (
            f"Layers {list(layers)} for backbone '{backbone}' must be distinct and ordered shallow to deep, "
            f"as in {available}"
        )
        raise ValueError(msg)
    return indices


def create_feature_extractor(
    backbone: str,
    layers: Sequence[str] | None = None,
    pre_trained: bool = True,
    weights: str | Path | None = None,
) -> FrozenFeatureExtractor:
    """Create a frozen timm feature extractor for the given layers.

    anomalib's ``TimmFeatureExtractor`` is not reused because it cannot load a local weights file and silently
    drops unknown layer names; this is the same timm ``features_only`` model with those two gaps closed.

    Args:
        backbone: timm model name, e.g. ``"wide_resnet50_2"`` or ``"tf_efficientnet_lite0"``.
        layers: timm module names of the feature levels to return, shallow to deep, e.g.
            ``("layer1", "layer2", "layer3")`` or ``("blocks.1", "blocks.2", "blocks.4")``; ``None``: the
            stride-4/8/16 stages (:func:`stage_layers`).
        pre_trained: Use ImageNet weights. Ignored when ``weights`` is given.
        weights: Local timm-format state dict for the full ``backbone`` (a plain state dict, or a checkpoint with it
            under ``"state_dict"`` or ``"model"``), or ``"packaged"`` (:func:`~anomalib_adfa.weights.packaged_weights`).
            Loaded strictly, without any network access (:func:`~anomalib_adfa.weights.pretrained_model`).

    Returns:
        The frozen extractor; its ``channels`` and ``strides`` describe the selected layers.

    Raises:
        ValueError: If ``layers`` is empty, a layer name is unknown or out of order.
        BackboneWeightsError: If ``weights`` does not exist or does not match ``backbone``, or ``pre_trained`` is set,
            no ``weights`` are given and the weights are neither in the local hub cache nor downloadable.
    """
    layers = stage_layers(backbone) if layers is None else tuple(layers)
    reference = meta_model(backbone)
    indices = _layer_indices(backbone, layers, reference)
    options = {"features_only": True, "out_indices": indices, "exportable": True}
    model = pretrained_model(backbone, options, pre_trained=pre_trained, weights=weights)
    info = model.feature_info
    return FrozenFeatureExtractor(model, layers, info.channels(), info.reduction())
