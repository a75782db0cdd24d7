"""Two-process DDP training on CPU (gloo) agrees with a single process.

One DDP run (``strategy="ddp"``, 2 CPU processes) is launched in a subprocess: this file is its script,
and Lightning's launcher starts the second rank by running the same command again. Each rank writes what
it saw at the first optimisation step: its centres, its feature-cache contents, its loss and the gradients
after DDP's all-reduce. The tests compare them with a single-process computation on the same images and
initial weights, then load the checkpoint of the DDP run in a single process and score the test images.

The training set holds an odd number of images (9), so the ``DistributedSampler`` pads one rank's shard
with a repeated image: the centre bank must still count every image exactly once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from anomalib_adfa import Adfa
from anomalib_adfa.feature_cache import FeatureCache
from anomalib_adfa.loss import AdfaLoss
from anomalib_adfa.synthetic import make_phantom_dataset

N_TRAIN = 9  # odd: the 2-rank DistributedSampler repeats one image to even out the shards
N_TEST = 8  # per class
PER_RANK_BATCH = 2
WORLD_SIZE = 2
EPOCHS = 3
SEED = 7
MODEL_KWARGS: dict[str, Any] = {
    "backbone": "tf_efficientnet_lite0",
    "pre_trained": False,
    "image_size": (72, 72),
    "center_crop_size": (64, 64),
    "visualizer": False,
}


def _datamodule(root: Path, train_batch_size: int) -> Folder:
    return Folder(
        name="phantom",
        root=root,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/lesion",
        train_batch_size=train_batch_size,
        eval_batch_size=N_TEST,
        num_workers=0,
        val_split_mode="same_as_test",
        seed=SEED,
    )


def _train_paths(root: Path) -> list[str]:
    return sorted(str(path) for path in (root / "train" / "good").iterdir())


class _FirstStepProbe(Callback):
    """Save, on every rank, the state at the first optimisation step to ``<out>/rank<r>.pt``."""

    def __init__(self, out_dir: Path, train_paths: list[str]) -> None:
        self.out_dir = out_dir
        self.train_paths = train_paths
        self.record: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > 0 or batch_idx > 0:
            return
        cache = pl_module.feature_cache
        self.record = {
            "weights": {name: value.clone() for name, value in pl_module.model.state_dict().items()},
            "batch_paths": list(batch.image_path),
            "cached": [cache.get([path], torch.device("cpu"), torch.float32) is not None for path in self.train_paths],
        }

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == 0 and "grads" not in self.record:
            self.record["grads"] = {
                name: param.grad.clone() for name, param in pl_module.model.descriptor.named_parameters()
            }

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == 1 and "loss" not in self.record:
            self.record["loss"] = outputs["loss"].detach().clone()
            torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


def _ddp_worker(root: Path, out_dir: Path) -> None:
    """Body of the DDP script: train on ``root`` with 2 CPU processes, probing the first step."""
    torch.set_num_threads(1)
    seed_everything(SEED)
    model = Adfa(**MODEL_KWARGS)  # same seed, same initial weights as the single-process run below
    engine = Engine(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy="ddp",
        max_epochs=EPOCHS,
        default_root_dir=out_dir / "run",
        callbacks=[_FirstStepProbe(out_dir, _train_paths(root))],
        enable_progress_bar=False,
    )
    engine.fit(model, datamodule=_datamodule(root, PER_RANK_BATCH))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Phantom dataset and output folder of one 2-process DDP training."""
    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, n_train=N_TRAIN, n_test_normal=N_TEST, n_test_abnormal=N_TEST, image_size=64, seed=SEED)
    out_dir = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for variable in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(variable, None)
    command = [sys.executable, str(Path(__file__).resolve()), "--root", str(root), "--out", str(out_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"DDP run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return root, out_dir


def _ranks(out_dir: Path) -> list[dict[str, Any]]:
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _initial_model(record: dict[str, Any]) -> Adfa:
    """Single-process model with the DDP run's initial weights (random backbone, descriptor, centres)."""
    model = Adfa(**MODEL_KWARGS)
    model.model.load_state_dict(record["weights"])
    return model


def _images(model: Adfa, root: Path, paths: list[str]) -> torch.Tensor:
    """Training images, pre-processed as in training, in the order of ``paths``."""
    datamodule = _datamodule(root, PER_RANK_BATCH)
    datamodule.setup()
    dataset = datamodule.train_data
    by_path = {item.image_path: item.image for item in (dataset[index] for index in range(len(dataset)))}
    return model.pre_processor.transform(torch.stack([by_path[path] for path in paths]))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_centres_count_every_image_once(ddp_run: tuple[Path, Path]) -> None:
    root, out_dir = ddp_run
    ranks = _ranks(out_dir)
    centres = [record["weights"]["centers"] for record in ranks]
    assert torch.equal(centres[0], centres[1]), "ranks hold different centre banks"

    model = _initial_model(ranks[0])
    with torch.no_grad():
        descriptors = model.model.describe(model.model.extract_features(_images(model, root, _train_paths(root))))
    expected = descriptors.double().mean(dim=0).flatten(1).T.float()
    assert centres[0].shape == expected.shape
    assert _relative_error(centres[0], expected) < 1e-5
    torch.testing.assert_close(centres[0], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_each_rank_caches_its_own_shard(ddp_run: tuple[Path, Path]) -> None:
    _, out_dir = ddp_run
    cached = torch.tensor([record["cached"] for record in _ranks(out_dir)])
    assert sorted(cached.sum(dim=1).tolist()) == [N_TRAIN // 2, N_TRAIN - N_TRAIN // 2]
    assert cached.sum(dim=0).eq(1).all(), "every training image must be cached by exactly one rank"


def test_first_step_loss_and_gradients_match_single_process(ddp_run: tuple[Path, Path]) -> None:
    root, out_dir = ddp_run
    ranks = _ranks(out_dir)
    model = _initial_model(ranks[0])
    paths = ranks[0]["batch_paths"] + ranks[1]["batch_paths"]
    assert len(set(paths)) == WORLD_SIZE * PER_RANK_BATCH

    # Training steps read the features back from the (float16) feature cache that the centre pass filled.
    cache = FeatureCache()
    images = _images(model, root, paths)
    cache.put(paths, model.model.extract_features(images))
    features = cache.get(paths, images.device, images.dtype)
    loss = AdfaLoss()(model.model.patch_scores(model.model.describe(features)))
    loss.backward()
    ddp_loss = torch.stack([record["loss"] for record in ranks]).mean()
    torch.testing.assert_close(ddp_loss, loss.detach(), rtol=1e-5, atol=0.0)
    for name, param in model.model.descriptor.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name], rtol=0.0, atol=0.0)
        assert _relative_error(ranks[0]["grads"][name], param.grad) < 1e-4, name


def _image_auroc(root: Path, tmp_dir: Path, ckpt_path: Path | None = None) -> tuple[float, Adfa]:
    """Test image AUROC of a single-process model: trained here, or loaded from ``ckpt_path``."""
    seed_everything(SEED)
    model = Adfa(**MODEL_KWARGS)
    datamodule = _datamodule(root, WORLD_SIZE * PER_RANK_BATCH)
    engine = Engine(
        accelerator="cpu", devices=1, max_epochs=EPOCHS, default_root_dir=tmp_dir, enable_progress_bar=False
    )
    if ckpt_path is None:
        engine.fit(model, datamodule=datamodule)
    (metrics,) = engine.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    return metrics["image_AUROC"], model


def test_checkpoint_scores_in_single_process_like_single_process_training(
    ddp_run: tuple[Path, Path], tmp_path: Path
) -> None:
    root, out_dir = ddp_run
    checkpoints = sorted((out_dir / "run").rglob("*.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    ddp_auroc, loaded = _image_auroc(root, tmp_path / "loaded", checkpoints[0])
    # The checkpoint holds the trained descriptor and the centres every rank computed.
    assert torch.equal(loaded.model.centers, _ranks(out_dir)[0]["weights"]["centers"])
    single_auroc, _ = _image_auroc(root, tmp_path / "single")
    assert 0.0 <= ddp_auroc <= 1.0
    assert abs(ddp_auroc - single_auroc) <= 0.05, (ddp_auroc, single_auroc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DDP worker of tests/test_distributed.py")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    _ddp_worker(arguments.root, arguments.out)
