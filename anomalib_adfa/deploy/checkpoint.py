"""Whether a checkpoint may be loaded into an ADFA model built with a requested configuration.

Every ``Adfa`` constructor argument falls in exactly one group (``tests/test_checkpoint.py`` checks
that the groups cover the signature, so a new argument cannot be forgotten):

* :data:`STATE_SETTINGS` decide the trained state itself: the shape and meaning of the descriptor
  weights and of the centre bank (which are the mean descriptor of the *pre-processed* training
  images), or the pre-processing the model expects. A checkpoint that differs in any of them
  describes another model; loading it would give other scores with no error, so it is refused
  with an :class:`IncompatibleCheckpointError` that lists every difference.
* :data:`SCORING_SETTINGS` only change how the loaded descriptors and centres are turned into
  scores (the top-k operator, the distance, the map smoothing). Scoring a checkpoint differently is
  a legitimate analysis, so it is allowed, but logged as a warning with both values, since the
  checkpoint's score normalisation and thresholds were fitted with its own scoring.
* :data:`LOADING_IRRELEVANT_SETTINGS` only act before or during training (optimiser, feature cache,
  where the initial backbone weights came from: the backbone's weights are part of the state dict,
  so a loaded model computes the checkpoint's features whatever it was initialised with), or only
  decide where evaluation compares the maps with masks (``mask_resolution``: the model's maps are
  unchanged, see :mod:`anomalib_adfa.mask_frame`), or only choose how the same scores are computed
  (``backend``, see :class:`~anomalib_adfa.scoring.PatchScorer`).

Values are compared in effective form: ``input_normalization=None`` means "the backbone's own
statistics", which for a Wide-ResNet are the ImageNet ones, so ``None`` and ``"imagenet"`` are the
same pre-processing there and are not refused. The effective configuration of a model is stored in
its checkpoints (:data:`CONFIGURATION_KEY`); for older checkpoints it is derived from their
hyperparameters.

:func:`check_compatibility` is the one check: ``Adfa.on_load_checkpoint`` calls it (through
:func:`accept_checkpoint`), which Lightning runs for ``test``, ``validate``, ``predict`` and ``fit`` with
``ckpt_path``, and :func:`anomalib_adfa.deploy.export.export_checkpoint` loads checkpoints through the same hook.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from anomalib_adfa.backbones import input_normalization_statistics
from anomalib_adfa.errors import AdfaInputError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

STATE_SETTINGS = (
    "backbone",
    "layers",
    "gamma_d",
    "attention_eps",
    "attention_kernel",
    "input_normalization",
    "image_size",
    "center_crop_size",
)
SCORING_SETTINGS = ("num_nearest", "topk_mode", "ot_epsilon", "distance", "score_sqrt", "sigma")
LOADING_IRRELEVANT_SETTINGS = (
    "pre_trained",
    "backbone_weights",
    "lr",
    "weight_decay",
    "cache_features",
    "cache_max_bytes",
    "mask_resolution",
    "backend",
)
COMPONENT_ARGUMENTS = ("pre_processor", "post_processor", "evaluator", "visualizer")
"""Component objects: not hyperparameters (anomalib checkpoints their own configuration)."""

CONFIGURATION_KEY = "adfa_configuration"
"""Checkpoint entry holding :func:`effective_configuration` of the model that was saved."""


class IncompatibleCheckpointError(AdfaInputError, ValueError):
    """Raised when a checkpoint was trained with another ADFA configuration."""


def effective_configuration(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Return the state and scoring settings of a model, in comparable form.

    Args:
        hparams: The model's (or a checkpoint's) hyperparameters.

    Returns:
        One entry per setting of :data:`STATE_SETTINGS` and :data:`SCORING_SETTINGS` present in
        ``hparams``; sequences become tuples and ``input_normalization`` becomes its ``(mean, std)``.
    """
    configuration = {
        name: _comparable(hparams[name]) for name in (*STATE_SETTINGS, *SCORING_SETTINGS) if name in hparams
    }
    if "backbone" in hparams:
        configuration["input_normalization"] = _comparable(
            input_normalization_statistics(hparams.get("input_normalization"), hparams["backbone"])
        )
    return configuration


def check_compatibility(requested: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> None:
    """Refuse a checkpoint trained with other state settings; log differing scoring settings.

    Args:
        requested: Hyperparameters of the model the checkpoint is loaded into.
        checkpoint: Lightning checkpoint dict (its :data:`CONFIGURATION_KEY` entry, else its
            ``"hyper_parameters"``, are read).

    Raises:
        IncompatibleCheckpointError: Naming every state setting that differs, with both values.
    """
    saved = checkpoint.get(CONFIGURATION_KEY) or effective_configuration(checkpoint.get("hyper_parameters", {}))
    wanted = effective_configuration(requested)

    def differences(names: tuple[str, ...]) -> list[str]:
        return [
            f"{name}: checkpoint has {_describe(name, checkpoint, saved)}, "
            f"this model has {_describe(name, requested, wanted)}"
            for name in names
            if name in saved and name in wanted and saved[name] != wanted[name]
        ]

    refused = differences(STATE_SETTINGS)
    if refused:
        msg = (
            "The ADFA checkpoint was trained with another configuration (these settings decide the trained "
            "descriptor, the centre bank or the pre-processing, so it cannot be used as this model):\n  "
            + "\n  ".join(refused)
        )
        raise IncompatibleCheckpointError(msg)
    rescored = differences(SCORING_SETTINGS)
    if rescored:
        logger.warning(
            "Scoring the ADFA checkpoint with other settings than it was trained with (allowed; its score "
            "normalisation and thresholds were fitted with its own settings, so refit them with "
            "`validate` before trusting pred_label):\n  %s",
            "\n  ".join(rescored),
        )


def _describe(name: str, source: Mapping[str, Any], effective: Mapping[str, Any]) -> str:
    """Show a setting's value as the user wrote it, with its effective value where they differ."""
    raw = _comparable(source.get("hyper_parameters", source).get(name, effective[name]))
    if name == "input_normalization":
        mean, std = effective[name]
        return f"{raw!r} (mean {mean}, std {std})"
    return repr(raw)


def _comparable(value: Any) -> Any:
    """Hyperparameters come back from YAML or a checkpoint as lists where the model has tuples."""
    if isinstance(value, list | tuple):
        return tuple(_comparable(item) for item in value)
    return value


def accept_checkpoint(
    hparams: Mapping[str, Any], checkpoint: dict[str, Any], derived_buffers: Mapping[str, torch.Tensor]
) -> None:
    """Refuse a checkpoint of another configuration; give it this model's buffers derived from scoring settings.

    Args:
        hparams: The requested model's hyperparameters.
        checkpoint: The Lightning checkpoint, changed in place.
        derived_buffers: ``state_dict`` keys and this model's values of buffers computed from scoring settings
            (ADFA's blur kernel, from ``sigma``), so a requested setting takes effect instead of the checkpoint's.

    Raises:
        IncompatibleCheckpointError: See :func:`check_compatibility`.
    """
    check_compatibility(hparams, checkpoint)
    state = checkpoint.get("state_dict", {})
    for key, value in derived_buffers.items():
        if key in state:
            state[key] = value.detach().clone()
