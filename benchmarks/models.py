"""Build every benchmarked model with one backbone, one set of backbone weights and one pre-processor.

anomalib's models take a timm backbone name and download its weights from the timm/Hugging Face hub. For offline
runs, :func:`local_timm_weights` makes timm load a local state dict instead whenever an anomalib feature extractor
asks for the pretrained backbone, so that PaDiM, STFPM and PatchCore use exactly the weights ADFA uses. Models
whose anomalib implementation cannot take the chosen backbone fail in :func:`build_model` with
:class:`UnsupportedModelError`, whose message says why.

Every model gets ADFA's post-processor (threshold at :data:`TARGET_SPECIFICITY` on validation normals,
rank-preserving normalisation) and ADFA's evaluator (anomalib's metrics plus the clinical ones).
``adfa_recommended`` is ADFA with the settings of ``configs/adfa_recommended.yaml`` (:func:`recommended_config`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import yaml
from anomalib.models import Cfa, Padim, Patchcore, ReverseDistillation, Stfpm
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor

from anomalib_adfa import Adfa, SpecificityPostProcessor
from anomalib_adfa.backbones import LITE0_LAYERS
from anomalib_adfa.evaluation.metrics import clinical_test_metrics
from anomalib_adfa.evaluation.operating_point import OperatingPointEvaluator
from anomalib_adfa.weights import LITE0_BACKBONE, load_state_dict_file

MODEL_NAMES = ("adfa", "adfa_recommended", "padim", "stfpm", "reverse_distillation", "patchcore", "cfa")

RECOMMENDED_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "adfa_recommended.yaml"

TARGET_SPECIFICITY = 0.95
"""Specificity on validation normals at which every model's image threshold is set."""

# Options the benchmark sets for every model alike; the recommended config's values for them are not used.
_SHARED_OPTIONS = ("backbone", "backbone_weights", "layers", "pre_trained", "image_size", "center_crop_size")


@functools.cache
def recommended_config() -> dict[str, Any]:
    """``configs/adfa_recommended.yaml``: ADFA options, epochs and the label-free selection quantity.

    Returns:
        ``{"options": Adfa keyword arguments (without the shared ones), "epochs": int, "selection": str | None}``.
    """
    config = yaml.safe_load(RECOMMENDED_CONFIG.read_text())
    options = {k: v for k, v in config["model"]["init_args"].items() if k not in _SHARED_OPTIONS}
    trainer = config.get("trainer", {})
    selection = [
        callback.get("init_args", {}).get("quantity", "synthetic_separation")
        for callback in trainer.get("callbacks", [])
        if callback.get("class_path", "").endswith("LabelFreeCheckpoint")
    ]
    return {"options": options, "epochs": int(trainer["max_epochs"]), "selection": selection[0] if selection else None}


def recommended_selection() -> str | None:
    """Label-free checkpoint-selection quantity of the recommended config (``None``: last epoch)."""
    return recommended_config()["selection"]


DOCUMENTED_EPOCHS = {
    "adfa": 200,
    "adfa_recommended": recommended_config()["epochs"],
    "padim": 1,
    "stfpm": 100,
    "reverse_distillation": 200,
    "patchcore": 1,
    "cfa": 30,
}
"""Epochs of each model's documented configuration (anomalib's example configs; ADFA's public code; ours)."""

# Stride-4/8/16 stages of each backbone, named as WR50's ``layer1``/``layer2``/``layer3`` that anomalib's defaults use.
_STAGE_LAYERS = {LITE0_BACKBONE: dict(zip(("layer1", "layer2", "layer3"), LITE0_LAYERS, strict=True))}

# PaDiM keeps a random subset of the concatenated channels; anomalib only documents the count for ResNets.
_PADIM_LITE0_FEATURES = 100


class UnsupportedModelError(RuntimeError):
    """Raised when a model's anomalib implementation cannot run with the requested backbone."""


@dataclass(frozen=True)
class ModelSettings:
    """What every benchmarked model shares.

    Attributes:
        backbone: timm backbone name.
        weights: Local timm-format state dict for the backbone, or ``None`` for timm's hub weights.
        pre_processor: Factory of the shared pre-processor (each model needs its own instance).
        adfa_options: Extra keyword arguments of :class:`~anomalib_adfa.Adfa` (ablations).
    """

    backbone: str
    weights: Path | None
    pre_processor: Callable[[], PreProcessor]
    adfa_options: dict[str, Any] = field(default_factory=dict)

    def layers(self, *names: str) -> list[str]:
        """Translate anomalib's WR50 layer names to this backbone's equivalent stages."""
        mapping = _STAGE_LAYERS.get(self.backbone, {})
        return [mapping.get(name, name) for name in names]


@contextlib.contextmanager
def local_timm_weights(backbone: str, weights: Path | None) -> Iterator[None]:
    """While active, ``timm.create_model(backbone, pretrained=True)`` loads ``weights`` instead of the hub's.

    Args:
        backbone: timm name the weights belong to; other models are created as usual.
        weights: timm-format state dict file, or ``None`` to change nothing.

    Yields:
        Nothing.
    """
    if weights is None:
        yield
        return
    state_dict = load_state_dict_file(weights)
    original = timm.create_model

    @functools.wraps(original)
    def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> Any:
        if pretrained and model_name == backbone:
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "state_dict": state_dict}
        return original(model_name, pretrained=pretrained, **kwargs)

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


def _common(settings: ModelSettings) -> dict[str, Any]:
    return {
        "pre_processor": settings.pre_processor(),
        "post_processor": SpecificityPostProcessor(target_specificity=TARGET_SPECIFICITY),
        "evaluator": OperatingPointEvaluator(test_metrics=clinical_test_metrics()),
        "visualizer": False,
    }


def _adfa(settings: ModelSettings) -> AnomalibModule:
    options = {"backbone_weights": settings.weights, **settings.adfa_options}
    return Adfa(
        backbone=settings.backbone, layers=settings.layers("layer1", "layer2", "layer3"), **options, **_common(settings)
    )


def _adfa_recommended(settings: ModelSettings) -> AnomalibModule:
    options = {**recommended_config()["options"], **settings.adfa_options}
    return _adfa(ModelSettings(settings.backbone, settings.weights, settings.pre_processor, options))


def _padim(settings: ModelSettings) -> AnomalibModule:
    n_features = _PADIM_LITE0_FEATURES if settings.backbone == LITE0_BACKBONE else None
    return Padim(
        backbone=settings.backbone,
        layers=settings.layers("layer1", "layer2", "layer3"),
        n_features=n_features,
        **_common(settings),
    )


def _stfpm(settings: ModelSettings) -> AnomalibModule:
    return Stfpm(backbone=settings.backbone, layers=settings.layers("layer1", "layer2", "layer3"), **_common(settings))


def _reverse_distillation(settings: ModelSettings) -> AnomalibModule:
    return ReverseDistillation(
        backbone=settings.backbone, layers=settings.layers("layer1", "layer2", "layer3"), **_common(settings)
    )


def _patchcore(settings: ModelSettings) -> AnomalibModule:
    return Patchcore(backbone=settings.backbone, layers=settings.layers("layer2", "layer3"), **_common(settings))


def _cfa(settings: ModelSettings) -> AnomalibModule:
    if settings.weights is not None:
        msg = (
            "anomalib's CFA builds its backbone with torchvision (torchvision.models.get_model_weights(...).DEFAULT, a "
            "download) for resnet18/wide_resnet50_2/vgg19_bn only, so it cannot use a local timm weights file"
        )
        raise UnsupportedModelError(msg)
    return Cfa(backbone=settings.backbone, **_common(settings))


_BUILDERS: dict[str, Callable[[ModelSettings], AnomalibModule]] = {
    "adfa": _adfa,
    "adfa_recommended": _adfa_recommended,
    "padim": _padim,
    "stfpm": _stfpm,
    "reverse_distillation": _reverse_distillation,
    "patchcore": _patchcore,
    "cfa": _cfa,
}


def build_model(name: str, settings: ModelSettings) -> AnomalibModule:
    """Build one model with the shared backbone, weights and pre-processor, and anomalib's defaults otherwise.

    Args:
        name: One of :data:`MODEL_NAMES`.
        settings: The shared settings.

    Returns:
        The model.

    Raises:
        ValueError: If ``name`` is unknown.
        UnsupportedModelError: If the model's anomalib implementation cannot use this backbone or these weights.
    """
    if name not in _BUILDERS:
        msg = f"unknown model {name!r}; choose from {MODEL_NAMES}"
        raise ValueError(msg)
    try:
        with local_timm_weights(settings.backbone, settings.weights):
            return _BUILDERS[name](settings)
    except UnsupportedModelError:
        raise
    except (ValueError, NotImplementedError, KeyError) as err:
        msg = f"anomalib's {name} cannot be built with backbone {settings.backbone!r}: {type(err).__name__}: {err}"
        raise UnsupportedModelError(msg) from err
