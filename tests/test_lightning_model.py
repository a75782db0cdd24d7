"""ADFA inside anomalib: centre initialisation, feature cache, checkpoints, training by the CLI."""

import copy
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from anomalib_adfa import Adfa
from anomalib_adfa.backbones import LITE0_LAYERS
from anomalib_adfa.deploy.checkpoint import IncompatibleCheckpointError
from anomalib_adfa.feature_cache import feature_fingerprint

SMALL = {
    "backbone": "tf_efficientnet_lite0",
    "pre_trained": False,
    "image_size": (40, 40),
    "center_crop_size": (32, 32),
}


ANOMALIB = Path(sys.executable).with_name("anomalib")


def _write_images(folder: Path, count: int, rng: np.random.Generator, bright: bool = False) -> None:
    folder.mkdir(parents=True)
    for index in range(count):
        size = (48 + 4 * index, 44)  # mixed sizes: resizing happens in the datamodule and pre-processor
        pixels = rng.normal(100, 10, size=(size[1], size[0])).clip(0, 255)
        if bright:
            pixels[10:25, 10:25] = 250
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(folder / f"img_{index:02d}.png")


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    _write_images(root / "train" / "good", 7, rng)
    _write_images(root / "test" / "good", 4, rng)
    _write_images(root / "test" / "bad", 4, rng, bright=True)
    return root


def _datamodule(root: Path) -> Folder:
    return Folder(
        name="toy",
        root=root,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/bad",
        train_batch_size=3,
        eval_batch_size=4,
        num_workers=0,
        val_split_mode="same_as_test",
    )


def _engine(root: Path, epochs: int = 2) -> Engine:
    return Engine(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root)


@pytest.fixture(scope="module")
def trained(folder_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Adfa, Adfa, Engine, Path]:
    torch.manual_seed(0)
    model = Adfa(**SMALL, topk_mode="hard")
    untrained = copy.deepcopy(model)
    engine = _engine(tmp_path_factory.mktemp("run"))
    engine.fit(model, datamodule=_datamodule(folder_root))
    checkpoint = tmp_path_factory.mktemp("ckpt") / "adfa.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return model, untrained, engine, checkpoint


def test_centres_are_the_mean_descriptor_of_preprocessed_training_images(trained, folder_root: Path) -> None:
    model, untrained, _, _ = trained
    datamodule = _datamodule(folder_root)
    # What training sees: the datamodule's resize, then the model's own pre-processor.
    datamodule.train_augmentations = untrained.pre_processor.transform.transforms[0]
    datamodule.setup("fit")
    images = torch.stack([item.image for item in datamodule.train_data])
    with torch.no_grad():
        descriptors = untrained.model.describe(
            untrained.model.extract_features(untrained.pre_processor.transform(images))
        )
    expected = descriptors.mean(dim=0).flatten(1).T
    assert model.model.centers.shape == (8 * 8, model.model.descriptor_channels)
    torch.testing.assert_close(model.model.centers, expected, rtol=1e-5, atol=1e-6)


def test_feature_cache_serves_every_epoch_after_the_centre_pass(trained) -> None:
    model, _, engine, _ = trained
    assert len(model.feature_cache) == 7
    # The logged rate covers the last epoch: every image came from the cache filled by the centre pass.
    assert engine.trainer.callback_metrics["feature_cache_hit_rate"].item() == 1.0
    model.feature_cache.bind("another backbone")
    assert len(model.feature_cache) == 0


def test_ddp_shards_stay_fixed_while_features_are_cached() -> None:
    dataset = list(range(10))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
    first_epoch = list(sampler)
    model = Adfa(**SMALL)
    model._trainer = SimpleNamespace(train_dataloader=DataLoader(dataset, sampler=sampler))
    sampler.set_epoch(1)  # what Lightning does before every epoch
    model.on_train_epoch_start()
    assert list(sampler) == first_epoch
    model.feature_cache.disable("random augmentations")
    sampler.set_epoch(1)
    model.on_train_epoch_start()
    assert list(sampler) != first_epoch


def test_checkpoint_round_trip_keeps_centres_and_scores(trained) -> None:
    model, _, _, checkpoint = trained
    restored = Adfa.load_from_checkpoint(checkpoint)
    torch.testing.assert_close(restored.model.centers, model.model.centers)
    images = torch.rand(2, 3, 40, 40)
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(images).pred_score, model(images).pred_score)


def test_checkpoint_from_another_configuration_is_refused(trained, folder_root: Path, tmp_path: Path) -> None:
    checkpoint = trained[3]
    other = Adfa(**{**SMALL, "gamma_d": 8})
    with pytest.raises(IncompatibleCheckpointError, match=r"gamma_d: checkpoint has 4, this model has 8"):
        _engine(tmp_path).test(other, datamodule=_datamodule(folder_root), ckpt_path=checkpoint)


def test_anomalib_cli_trains_adfa_by_its_bare_name(folder_root: Path, tmp_path: Path) -> None:
    command = [
        str(ANOMALIB), "train", "--model", "Adfa",
        "--model.backbone", "tf_efficientnet_lite0", "--model.layers", "[blocks.1, blocks.2, blocks.4]",
        "--model.pre_trained", "false", "--model.image_size", "[40, 40]", "--model.center_crop_size", "[32, 32]",
        "--data", "anomalib.data.Folder", "--data.name", "toy", "--data.root", str(folder_root),
        "--data.normal_dir", "train/good", "--data.normal_test_dir", "test/good", "--data.abnormal_dir", "test/bad",
        "--data.num_workers", "0", "--data.val_split_mode", "same_as_test",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--default_root_dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image_AUROC" in result.stdout
    assert list(tmp_path.rglob("*.ckpt")), "no checkpoint written"


def small_adfa(**kwargs: object) -> Adfa:
    return Adfa(**{**SMALL, "image_size": (72, 72), "center_crop_size": (64, 64), **kwargs})


def fingerprint(model: Adfa) -> str:
    return feature_fingerprint(model.hparams, model.pre_processor.transform)


def test_fingerprint_tracks_backbone_layers_and_pre_processing() -> None:
    reference = fingerprint(small_adfa())
    assert fingerprint(small_adfa()) == reference
    assert fingerprint(small_adfa(image_size=(80, 80))) != reference
    assert fingerprint(small_adfa(input_normalization="imagenet")) != reference
    assert fingerprint(small_adfa(layers=("blocks.1", "blocks.2", "blocks.6"))) != reference


@pytest.mark.parametrize(("augmentations", "cached"), [(v2.Resize((64, 64)), True), (v2.RandomVerticalFlip(), False)])
def test_train_start_disables_the_cache_for_random_augmentations(
    augmentations: v2.Transform, cached: bool, caplog: pytest.LogCaptureFixture
) -> None:
    model = small_adfa()
    model.model.set_centers(torch.zeros(64, model.model.descriptor_channels))  # skip the centre pass
    dataset = SimpleNamespace(augmentations=augmentations)
    model.trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=dataset))
    with caplog.at_level(logging.WARNING):
        model.on_train_start()
    assert model.feature_cache.enabled is cached
    assert ("RandomVerticalFlip" in caplog.text) is not cached
    assert (model.feature_cache.fingerprint == fingerprint(model)) is cached


def test_default_layers_are_the_stride_4_8_16_stages_and_saved_as_such() -> None:
    model = Adfa(**SMALL)  # no layer list: tf_efficientnet_lite0's blocks.1/2/4
    assert model.hparams.layers == LITE0_LAYERS
    assert model.model.feature_extractor.layers == LITE0_LAYERS
    assert Adfa(pre_trained=False).hparams.layers == ("layer1", "layer2", "layer3")  # WR50 as before
