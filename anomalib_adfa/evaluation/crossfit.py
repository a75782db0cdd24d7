"""Cross-fitted operating points: the deployed model trains on every normal, the threshold on out-of-fold scores.

A held-out calibration split (``from_train``) costs half the normals twice: the model trains on half, and the
threshold rests on the other half (BrainMRI: 29 and 29, so the 95 % threshold is one of the two highest scores).
:class:`CrossFitThreshold` keeps all of them for both:

1. the training normals are split into ``K`` seeded folds (:func:`~anomalib_adfa.data.split.seeded_folds`);
2. for each fold, a copy of the *untrained* model is trained, with the same trainer settings, on the other
   ``K - 1`` folds and scores the fold it did not see (raw ``pred_score`` and ``anomaly_map``);
3. the ``n`` out-of-fold predictions are handed to the deployed model's post-processor exactly as a validation epoch
   would hand them (:class:`.SpecificityPostProcessor`: conformal-rank threshold,
   pixel threshold, normalisation range);
4. the deployed model then trains on all ``n`` normals as usual. Validation is switched off for that fit
   (``limit_val_batches = 0``): a validation epoch would refit the post-processor on other images.

Everything happens in :meth:`CrossFitThreshold.on_fit_start`, so every checkpoint the run writes already holds the
thresholds; test, predict and the ONNX/OpenVINO exports use them as they use any fitted post-processor.

Why a callback (and not a datamodule or a model option): cross-fitting trains models, which only the trainer side
can do, and it works the same for every anomalib model (ADFA, PaDiM, PatchCore, ...) without touching them. The
datamodule side only has to keep every training normal in training: ``--data.val_split_mode crossfit`` for this
package's datamodules (recorded in ``protocol.json``; it refuses to run without this callback), ``none`` for
anomalib's own. Guarantee: cross-conformal, about ``2 alpha`` in the worst case, not the split-conformal ``alpha``
(:mod:`anomalib_adfa.evaluation.conformal`). Cost: ``K`` extra trainings on ``(K - 1) / K`` of the data. For
anomalib's memory-bank models (PaDiM, PatchCore) the callback fixes glibc's mmap threshold, without which PatchCore's
coreset fragments the heap (:func:`pin_mmap_threshold`).

CLI::

    anomalib train --model Adfa --data anomalib_adfa.data.BrainMRI --data.root ~/data/brain_tumor_dataset
        --data.val_split_mode crossfit --trainer.callbacks+=anomalib_adfa.callbacks.CrossFitThreshold
        [--trainer.callbacks.folds 5]
"""

from __future__ import annotations

import copy
import csv
import ctypes
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import ImageBatch
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.models.components import MemoryBankMixin
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from anomalib_adfa.data.protocols import CROSSFIT, seeded_global_rngs
from anomalib_adfa.data.split import seeded_folds
from anomalib_adfa.evaluation.conformal import clopper_pearson, conformal_rank, false_alarm_bound

logger = logging.getLogger(__name__)

CROSSFIT_SCORES_FILE = "crossfit_scores.csv"
"""Out-of-fold raw scores, written to the run folder: ``image_path, fold, pred_score``."""

_OPTION = "--trainer.callbacks.folds"

MMAP_THRESHOLD_BYTES = 4 << 20
"""glibc mmap threshold for anomalib memory-bank models (PaDiM, PatchCore): blocks of 4 MiB or more go back at free."""

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>

# Logged names of LabelFreeCheckpoint's quantities (anomalib_adfa.callbacks.SELECTION_QUANTITIES; not imported, since
# that module imports this one).
_VALIDATION_QUANTITIES = ("val_synthetic_AUROC", "val_synthetic_separation", "val_normal_score")


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; ``False`` where it was left alone.

    Why: glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so after a training loop
    blocks of a few MiB come from the heap instead of ``mmap``. anomalib's k-centre-greedy coreset (PatchCore's
    ``fit``) allocates one ``(patches, dims)`` temporary per selected centre; when it runs at the end of a training
    epoch (as every fit does under cross-fitting, where validation is off), small allocations split each freed
    temporary and the heap grows by about one temporary per centre. Measured on BrainMRI, Lite0, 128 px, PatchCore
    cross-fit: peak 18.4 GB, 1.3 GB with the threshold fixed at 4 MiB, same AUROC and threshold. Fixing the threshold
    is glibc's own switch (``mallopt(M_MMAP_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_`` does); it is left alone when
    that variable is set, and off glibc.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def check_fold_count(folds: int, normals: int | None = None) -> int:
    """Return ``folds``, or raise a one-line error naming the option when it cannot split ``normals`` images.

    Each fold model must train on at least one image and score at least one: ``2 <= folds <= normals``.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        msg = f"CrossFitThreshold folds must be an integer of at least 2, got {folds!r}: set {_OPTION} 5 (or 2..n)"
        raise ValueError(msg)
    if normals is None:
        return folds
    if normals < 2:
        msg = (
            f"CrossFitThreshold needs at least 2 normal training images to cross-fit, found {normals}: add normal "
            "images or use val_split_mode same_as_test"
        )
        raise ValueError(msg)
    if folds > normals:
        msg = (
            f"CrossFitThreshold folds={folds} exceeds the {normals} normal training images: set {_OPTION} "
            f"{normals} or fewer"
        )
        raise ValueError(msg)
    return folds


class _RawPredictions(Callback):
    """Keep copies of the raw predictions of a fold model (trainer callbacks run before its post-processor)."""

    def __init__(self) -> None:
        self.batches: list[ImageBatch] = []

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        del trainer, pl_module, args
        scores = outputs.pred_score.detach().reshape(-1).cpu().clone()
        maps = outputs.anomaly_map.detach().cpu().clone() if outputs.anomaly_map is not None else None
        self.batches.append(
            ImageBatch(
                image=torch.zeros(scores.numel(), 3, 1, 1),
                gt_label=outputs.gt_label.detach().reshape(-1).cpu().clone(),
                pred_score=scores,
                anomaly_map=maps,
                image_path=list(outputs.image_path) if outputs.image_path is not None else [""] * scores.numel(),
            )
        )


class CrossFitThreshold(Callback):
    """Fit the model's post-processor on out-of-fold scores of ``folds`` fold models; train the model on all normals.

    See the module docstring for the protocol and why it is a callback.

    Args:
        folds: ``K``, the number of fold models (default 5), from 2 to the number of normal training images.
        seed: Seed of the fold split and of each fold model's training (fold ``k`` runs under ``seed + k``, in a
            fork of torch's and numpy's global CPU generators, so the fold models do not shift the deployed
            model's random draws). Default: the datamodule's ``seed`` (0 when it has none).

    Attributes:
        scores: ``(n,)`` raw out-of-fold image scores after fitting, in the order of :attr:`paths`.
        paths: Image path of each score.
        fold_of: Fold of each score.

    Raises:
        ValueError: At construction, for ``folds < 2``; at fit, for ``folds`` above the number of normal training
            images, a datamodule that holds training normals out for validation, a post-processor without a
            normal-image threshold (``target_specificity``), or several devices.
    """

    def __init__(self, folds: int = 5, seed: int | None = None) -> None:
        super().__init__()
        self.folds = check_fold_count(folds)
        self.seed = seed
        self.scores = torch.empty(0, dtype=torch.float64)
        self.paths: list[str] = []
        self.fold_of: list[int] = []
        self._limit_val_batches: int | float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the run can be cross-fitted, and switch validation off for the fit (see the module docstring)."""
        if stage != "fit":
            return
        if trainer.world_size > 1:
            msg = "CrossFitThreshold runs on one device; train with --trainer.devices 1"
            raise ValueError(msg)
        post_processor = getattr(pl_module, "post_processor", None)
        if getattr(post_processor, "target_specificity", None) is None:
            msg = (
                f"CrossFitThreshold needs a post-processor that sets the threshold on normal images, got "
                f"{type(post_processor).__name__}: set --model.post_processor anomalib_adfa.SpecificityPostProcessor"
            )
            raise ValueError(msg)
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_data"):
            msg = "CrossFitThreshold needs a datamodule with a train_data dataset (pass datamodule=..., or --data)"
            raise ValueError(msg)
        mode = getattr(datamodule, "val_split_mode", None)
        held_out = getattr(datamodule, "val_data", None)
        if getattr(mode, "value", mode) != CROSSFIT and held_out is not None and len(held_out) > 0:
            msg = (
                f"CrossFitThreshold trains on every normal, but val_split_mode={getattr(mode, 'value', mode)} holds "
                f"{len(held_out)} images out for validation: set --data.val_split_mode crossfit (anomalib_adfa "
                "datamodules) or none (anomalib's)"
            )
            raise ValueError(msg)
        selectors = [
            type(c).__name__ for c in trainer.callbacks if getattr(c, "monitor", None) in _VALIDATION_QUANTITIES
        ]
        if selectors:
            msg = (
                f"{selectors[0]} selects epochs on a validation set, which CrossFitThreshold switches off: drop it "
                "(the deployed model keeps its last epoch) or use val_split_mode synthetic without CrossFitThreshold"
            )
            raise ValueError(msg)
        check_fold_count(self.folds, self._normal_count(datamodule.train_data))
        if isinstance(pl_module, MemoryBankMixin) and pin_mmap_threshold():
            logger.info(
                "CrossFitThreshold: glibc mmap threshold fixed at %d bytes (see pin_mmap_threshold)",
                MMAP_THRESHOLD_BYTES,
            )
        self._limit_val_batches = trainer.limit_val_batches
        trainer.limit_val_batches = 0

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give validation back its setting, so a later ``validate`` behaves as without this callback."""
        del pl_module
        if self._limit_val_batches is not None:
            trainer.limit_val_batches = self._limit_val_batches

    @staticmethod
    def _normal_count(dataset: AnomalibDataset) -> int:
        return int((dataset.samples.label_index == 0).sum())

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Train the fold models, score their held-out folds, and fit the deployed model's post-processor."""
        datamodule = trainer.datamodule
        seed = self.seed if self.seed is not None else int(getattr(datamodule, "seed", None) or 0)
        train_data: AnomalibDataset = datamodule.train_data
        samples = train_data.samples
        # Row positions, as ``subsample`` takes them.
        keys = {str(samples.image_path.iloc[row]): row for row in np.flatnonzero(samples.label_index.to_numpy() == 0)}
        folds = seeded_folds(keys, check_fold_count(self.folds, len(keys)), seed)
        untrained = _detached_copy(pl_module)
        batches: list[ImageBatch] = []
        fold_of: list[int] = []
        for number, held_out in enumerate(folds):
            rest = [keys[key] for other, fold in enumerate(folds) if other != number for key in fold]
            with seeded_global_rngs(seed + number):
                predictions = self._fit_and_score(
                    copy.deepcopy(untrained), trainer, train_data, rest, [keys[key] for key in held_out]
                )
            batches += predictions
            fold_of += [number] * sum(int(batch.pred_score.numel()) for batch in predictions)
            logger.info("CrossFitThreshold: fold %d/%d scored %d normal images", number + 1, len(folds), len(held_out))
        self._fit_post_processor(trainer, pl_module, batches)
        self.scores = torch.cat([batch.pred_score.double() for batch in batches])
        self.paths = [path for batch in batches for path in batch.image_path]
        self.fold_of = fold_of
        self._report(trainer, pl_module)

    def _fit_and_score(
        self,
        model: LightningModule,
        trainer: Trainer,
        dataset: AnomalibDataset,
        train_rows: list[int],
        held_out_rows: list[int],
    ) -> list[ImageBatch]:
        """Train ``model`` on ``train_rows`` of ``dataset`` with the run's settings; predict ``held_out_rows``.

        Held-out images are loaded as test images are (the test split's augmentations, no shuffling).

        Returns:
            The raw predictions, one batch per held-out batch.
        """
        from anomalib.engine import Engine  # the engine imports callbacks; imported here to keep this module light

        datamodule = trainer.datamodule
        collate = getattr(datamodule, "external_collate_fn", None) or dataset.collate_fn
        workers = getattr(datamodule, "num_workers", 0)
        train_part = dataset.subsample(train_rows)
        held_out = dataset.subsample(held_out_rows)
        test_data = getattr(datamodule, "test_data", None)
        held_out.augmentations = getattr(test_data, "augmentations", None)
        train_loader = DataLoader(
            train_part,
            batch_size=getattr(datamodule, "train_batch_size", 32),
            shuffle=True,
            num_workers=workers,
            collate_fn=collate,
        )
        held_out_loader = DataLoader(
            held_out, batch_size=getattr(datamodule, "eval_batch_size", 32), num_workers=workers, collate_fn=collate
        )
        device = next(iter(trainer.lightning_module.parameters()), torch.empty(0)).device
        recorder = _RawPredictions()
        with tempfile.TemporaryDirectory() as folder:
            engine = Engine(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=[device.index or 0] if device.type == "cuda" else 1,
                max_epochs=trainer.max_epochs,
                max_steps=trainer.max_steps,
                precision=trainer.precision,
                default_root_dir=folder,
                logger=False,
                callbacks=[recorder],
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            engine.fit(model, train_dataloaders=train_loader)
            engine.predict(model, dataloaders=held_out_loader, return_predictions=False)
        return recorder.batches

    @staticmethod
    def _fit_post_processor(trainer: Trainer, pl_module: LightningModule, batches: list[ImageBatch]) -> None:
        """Run one validation epoch of the deployed model's post-processor on the out-of-fold predictions."""
        post_processor = pl_module.post_processor
        device = pl_module.device
        for batch in batches:
            moved = ImageBatch(
                image=batch.image.to(device),
                gt_label=batch.gt_label.to(device),
                pred_score=batch.pred_score.to(device),
                anomaly_map=batch.anomaly_map.to(device) if batch.anomaly_map is not None else None,
            )
            post_processor.on_validation_batch_end(trainer, pl_module, moved)
        post_processor.on_validation_epoch_end(trainer, pl_module)

    def _report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the calibration in the post-processor, print it, and save the out-of-fold scores."""
        post_processor = pl_module.post_processor
        target = float(post_processor.target_specificity)
        count = int(self.scores.numel())
        rank = conformal_rank(count, target)
        cleared = int((self.scores <= float(post_processor.image_threshold)).sum())
        stats = dict(getattr(post_processor, "image_threshold_stats", {}))
        stats.update(calibration=f"crossfit ({self.folds} folds, out-of-fold scores)", folds=self.folds)
        post_processor.image_threshold_stats = stats
        interval = clopper_pearson(cleared, count)
        message = (
            f"CrossFitThreshold: {self.folds} fold models scored the {count} training normals out of fold; image "
            f"threshold at rank {rank} of {count} (target specificity {target}), raw "
            f"{float(post_processor.image_threshold):.6g}; "
            f"out-of-fold specificity {cleared}/{count} = {cleared / count:.3f} (95% Clopper-Pearson "
            f"[{interval.low:.3f}, {interval.high:.3f}]); cross-conformal guarantee: a new normal image is flagged "
            f"with probability at most about {2 * (1 - target):.3f} (2 alpha; the split-conformal bound "
            f"{false_alarm_bound(count, target):.3f} applies only to a held-out split)"
        )
        print(message)
        if trainer.is_global_zero:
            folder = Path(trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / CROSSFIT_SCORES_FILE).open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(("image_path", "fold", "pred_score"))
                writer.writerows(zip(self.paths, self.fold_of, self.scores.tolist(), strict=True))


def _detached_copy(module: LightningModule) -> LightningModule:
    """Deep copy of a module attached to a trainer, without copying the trainer."""
    trainer = module._trainer  # Lightning keeps the trainer here; the copy must not share it
    module._trainer = None
    try:
        return copy.deepcopy(module)
    finally:
        module._trainer = trainer
