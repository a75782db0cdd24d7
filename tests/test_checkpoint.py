"""Checkpoint compatibility: every state setting refused, scoring settings applied and logged, in every entry point.

One small ADFA (random Lite0 weights, 64 px phantoms, one epoch) is trained once; each test builds the
model a user would request and loads that checkpoint into it.
"""

from __future__ import annotations

import inspect
import logging
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine

from anomalib_adfa import Adfa
from anomalib_adfa.backbones import LITE0_LAYERS
from anomalib_adfa.deploy.checkpoint import (
    COMPONENT_ARGUMENTS,
    CONFIGURATION_KEY,
    LOADING_IRRELEVANT_SETTINGS,
    SCORING_SETTINGS,
    STATE_SETTINGS,
    IncompatibleCheckpointError,
    check_compatibility,
    effective_configuration,
)
from anomalib_adfa.deploy.export import export_checkpoint, load_checkpoint_into
from anomalib_adfa.synthetic import ABNORMAL_DIR, MASK_DIR, NORMAL_DIR, NORMAL_TEST_DIR, make_phantom_dataset
from anomalib_adfa.weights import LITE0_BACKBONE, efficientnet_lite0_weights

CONFIG = {
    "backbone": LITE0_BACKBONE,
    "layers": LITE0_LAYERS,
    "pre_trained": False,
    "image_size": (72, 72),
    "center_crop_size": (64, 64),
}
# Another value for each state setting, and the text the refusal must contain.
STATE_CHANGES = {
    "backbone": ("tf_efficientnet_lite1", "backbone: checkpoint has 'tf_efficientnet_lite0'"),
    "layers": (("blocks.1", "blocks.2", "blocks.3"), "layers: checkpoint has ('blocks.1', 'blocks.2', 'blocks.4')"),
    "gamma_d": (8, "gamma_d: checkpoint has 4, this model has 8"),
    "attention_eps": (0.0, "attention_eps: checkpoint has 0.1, this model has 0.0"),
    "attention_kernel": ("eca", "attention_kernel: checkpoint has 9, this model has 'eca'"),
    "input_normalization": ("imagenet", "input_normalization: checkpoint has None (mean (0.5, 0.5, 0.5)"),
    "image_size": ((80, 80), "image_size: checkpoint has (72, 72), this model has (80, 80)"),
    "center_crop_size": ((56, 56), "center_crop_size: checkpoint has (64, 64), this model has (56, 56)"),
}
SCORING_CHANGES = {
    "num_nearest": 5,
    "topk_mode": "hard",
    "ot_epsilon": 0.05,
    "distance": "squared",
    "score_sqrt": False,
    "sigma": 2.0,
}


def _datamodule(root: Path) -> Folder:
    return Folder(
        name="phantom",
        root=root,
        normal_dir=NORMAL_DIR,
        normal_test_dir=NORMAL_TEST_DIR,
        abnormal_dir=ABNORMAL_DIR,
        mask_dir=MASK_DIR,
        val_split_mode="same_as_test",
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
    )


def _engine(root: Path, **kwargs) -> Engine:
    return Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root, **kwargs)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, n_train=8, n_test_normal=4, n_test_abnormal=4, image_size=64, seed=1)
    return root


@pytest.fixture(scope="module")
def checkpoint_path(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    engine = _engine(tmp_path_factory.mktemp("train"), max_epochs=1)
    engine.fit(Adfa(**CONFIG), datamodule=_datamodule(phantom_root))
    return Path(engine.trainer.checkpoint_callback.best_model_path)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_every_constructor_argument_is_classified_exactly_once() -> None:
    groups = (STATE_SETTINGS, SCORING_SETTINGS, LOADING_IRRELEVANT_SETTINGS, COMPONENT_ARGUMENTS)
    classified = [name for group in groups for name in group]
    arguments = [name for name in inspect.signature(Adfa.__init__).parameters if name != "self"]
    assert sorted(classified) == sorted(arguments)
    assert len(classified) == len(set(classified))
    assert set(STATE_CHANGES) == set(STATE_SETTINGS)
    assert set(SCORING_CHANGES) == set(SCORING_SETTINGS)


def test_checkpoint_stores_the_effective_configuration(checkpoint_path: Path) -> None:
    stored = _load(checkpoint_path)[CONFIGURATION_KEY]
    assert stored == effective_configuration(Adfa(**CONFIG).hparams)
    assert stored["input_normalization"] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Lite0's own statistics


@pytest.mark.parametrize("name", STATE_SETTINGS)
def test_a_different_state_setting_is_refused(name: str, checkpoint_path: Path) -> None:
    value, message = STATE_CHANGES[name]
    checkpoint = _load(checkpoint_path)
    hparams = {**checkpoint["hyper_parameters"], name: value}
    with pytest.raises(IncompatibleCheckpointError, match=re.escape(message)):
        check_compatibility(hparams, checkpoint)
    # Also from the hyperparameters alone, as for checkpoints written before the configuration was stored.
    del checkpoint[CONFIGURATION_KEY]
    with pytest.raises(IncompatibleCheckpointError, match=re.escape(message)):
        check_compatibility(hparams, checkpoint)


def test_every_differing_state_setting_is_listed_at_once(checkpoint_path: Path) -> None:
    requested = Adfa(**{**CONFIG, "gamma_d": 8, "attention_eps": 0.0, "input_normalization": "imagenet"})
    with pytest.raises(IncompatibleCheckpointError) as refusal:
        load_checkpoint_into(requested, checkpoint_path)
    for name in ("gamma_d", "attention_eps", "input_normalization"):
        assert f"{name}: checkpoint has" in str(refusal.value)


def test_the_same_effective_normalisation_under_another_name_is_accepted(checkpoint_path: Path) -> None:
    checkpoint = _load(checkpoint_path)
    # Lite0's own statistics are mean = std = 0.5, which is what "half" names.
    check_compatibility({**checkpoint["hyper_parameters"], "input_normalization": "half"}, checkpoint)


@pytest.mark.parametrize("name", SCORING_SETTINGS)
def test_a_different_scoring_setting_is_applied_and_logged(
    name: str, checkpoint_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trained = Adfa.load_from_checkpoint(checkpoint_path).eval()
    requested = Adfa(**{**CONFIG, name: SCORING_CHANGES[name]})
    with caplog.at_level(logging.WARNING, logger="anomalib_adfa.deploy.checkpoint"):
        load_checkpoint_into(requested, checkpoint_path)
    saved = trained.hparams[name]
    assert f"{name}: checkpoint has {saved!r}, this model has {SCORING_CHANGES[name]!r}" in caplog.text
    # The requested scoring is what runs: same descriptors and centres, other scores.
    torch.testing.assert_close(requested.model.centers, trained.model.centers)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, before = requested.model.eval()(images).anomaly_map, trained.model(images).anomaly_map
    assert not torch.allclose(got, before)
    if name == "sigma":
        expected = Adfa(**{**CONFIG, "sigma": SCORING_CHANGES["sigma"]}).model.anomaly_map_generator.blur.kernel
        torch.testing.assert_close(requested.model.anomaly_map_generator.blur.kernel, expected)


@pytest.mark.parametrize(
    "change",
    [
        {"pre_trained": True, "backbone_weights": "lite0"},
        {"lr": 0.5, "weight_decay": 0.0},
        {"cache_features": False},
        {"mask_resolution": "original"},
    ],
    ids=["backbone_weights", "optimiser", "cache", "mask_resolution"],
)
def test_settings_that_do_not_reach_a_loaded_model_are_accepted(change: dict, checkpoint_path: Path) -> None:
    if change.get("backbone_weights") == "lite0":
        change = {**change, "backbone_weights": efficientnet_lite0_weights()}
    trained = Adfa.load_from_checkpoint(checkpoint_path).eval()
    requested = Adfa(**{**CONFIG, **change})
    load_checkpoint_into(requested, checkpoint_path)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the backbone weights are part of the checkpoint
        torch.testing.assert_close(requested.eval()(images).pred_score, trained(images).pred_score)


@pytest.mark.parametrize("entry_point", ["test", "validate", "predict", "fit", "export"])
def test_every_entry_point_refuses_a_mismatched_checkpoint(
    entry_point: str, checkpoint_path: Path, phantom_root: Path, tmp_path: Path
) -> None:
    engine = _engine(tmp_path, max_epochs=2)
    requested = Adfa(**{**CONFIG, "attention_eps": 0.0})
    if entry_point == "export":  # ADFA's explicit form of engine.export(requested, "onnx", ckpt_path=...)
        run = partial(export_checkpoint, engine, requested, "onnx", export_root=tmp_path)
    elif entry_point == "predict":
        run = partial(engine.predict, requested, data_path=phantom_root / NORMAL_TEST_DIR)
    else:
        run = partial(getattr(engine, entry_point), requested, datamodule=_datamodule(phantom_root))
    with pytest.raises(IncompatibleCheckpointError, match=r"attention_eps: checkpoint has 0\.1, this model has 0\.0"):
        run(ckpt_path=checkpoint_path)
    assert not list(tmp_path.rglob("*.onnx"))


def test_engine_test_scores_a_checkpoint_with_the_requested_topk_mode(
    checkpoint_path: Path, phantom_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    requested = Adfa(**{**CONFIG, "topk_mode": "hard"})
    with caplog.at_level(logging.WARNING, logger="anomalib_adfa.deploy.checkpoint"):
        _engine(tmp_path).test(requested, datamodule=_datamodule(phantom_root), ckpt_path=checkpoint_path)
    assert "topk_mode: checkpoint has 'reference', this model has 'hard'" in caplog.text
    assert requested.model.scorer.topk.mode == "hard"
