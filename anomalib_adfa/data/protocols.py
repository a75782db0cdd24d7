"""Validation protocols of the medical datamodules: which images set the threshold, and the record of it.

``val_split_mode``:
``from_train`` (default)
    A seeded fraction (``val_split_ratio``, default 0.5) of the training normals is held out
    (:func:`~anomalib_adfa.data.split.seeded_partition`, so the same images on every machine). The
    post-processor fits its score normalisation and its operating point (a threshold at a target
    specificity, :class:`~anomalib_adfa.evaluation.post_processing.SpecificityPostProcessor`) on these unseen
    normal images: no test image and no real anomaly is used.
``synthetic``
    The same held-out normals, half of them turned into synthetic anomalies by anomalib's own
    :class:`~anomalib.data.utils.synthetic.SyntheticAnomalyDataset` (Perlin-noise blends, generated
    under a fork of the random state seeded with ``seed``, so reproducible). The threshold still
    comes from the held-out normal half; the synthetic anomalies give a validation AUROC for
    label-free model selection (:class:`~anomalib_adfa.callbacks.LabelFreeCheckpoint`).
``crossfit``
    All training normals train the deployed model and there is no validation set: the threshold comes
    from out-of-fold scores of ``K`` fold models, each trained on the other folds' normals
    (:class:`~anomalib_adfa.evaluation.crossfit.CrossFitThreshold`, which this mode requires:
    ``--trainer.callbacks+=anomalib_adfa.callbacks.CrossFitThreshold``). Uses every normal twice: to train
    the deployed model, and behind the threshold. Its guarantee is weaker than a held-out split's (see
    :mod:`anomalib_adfa.evaluation.conformal`).
``same_as_test`` (the paper's protocol)
    All training normals train and the validation set is a copy of the test split. Reproduces
    Table 1; its thresholds are test-calibrated, so ``pred_label`` and every thresholded metric
    are optimistic. ``--data.val_split_mode same_as_test``.

The test split is the paper's in every protocol; ``from_test`` (anomalib's usual default) would move half of it
into validation and is still accepted. The datamodule's setup
(:class:`~anomalib_adfa.data.base.MedicalDataModule`) logs and prints the protocol and the train / validation / test
counts (:func:`describe_protocol`) and keeps them as its ``protocol`` for the run folder
(:class:`~anomalib_adfa.callbacks.ProtocolRecorder`) and the benchmark.

Every normalisation used here is strictly increasing
(:class:`~anomalib_adfa.evaluation.post_processing.RankPreservingPostProcessor`), so the printed
``image_AUROC`` is the raw scores' AUROC under every protocol; ``tests/data/test_data_metrics.py``
checks the equality end to end.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib import TaskType
from anomalib.data.utils import LabelName, ValSplitMode
from anomalib.data.utils.synthetic import SyntheticAnomalyDataset

from anomalib_adfa.data.split import seeded_partition

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anomalib.data.datasets.base.image import AnomalibDataset
    from lightning.pytorch import Trainer

CROSSFIT = "crossfit"
"""``val_split_mode`` of the cross-fitting protocol (not one of anomalib's :class:`ValSplitMode` members)."""

PROTOCOL_FILE = "protocol.json"
"""Name of the validation-protocol record written to the run folder (next to ``weights/``)."""

RATIO_MODES = (ValSplitMode.FROM_TRAIN, ValSplitMode.SYNTHETIC, ValSplitMode.FROM_TEST)
"""Modes that read ``val_split_ratio``."""


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Run a block with numpy's and torch's global generators seeded, restoring both afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)


def hold_out_normals(
    dataset: AnomalibDataset, ratio: float, seed: int, root: Path
) -> tuple[AnomalibDataset, AnomalibDataset]:
    """Split a training set into (kept, held out), holding out ``ratio`` of its images.

    The hold-out is :func:`~anomalib_adfa.data.split.seeded_partition` of the image paths relative to the dataset's
    root, so the same images on every machine (anomalib's own draws with torch's generator).

    Args:
        dataset: Training set of one medical dataset.
        ratio: Fraction held out, in (0, 1).
        seed: Split seed.
        root: The datamodule's root, named in the error.

    Raises:
        ValueError: If either part would be empty.
    """
    samples = dataset.samples
    keys = {Path(path).relative_to(dataset.root).as_posix(): index for index, path in samples.image_path.items()}
    fraction = Fraction(str(ratio))
    held_out, kept = seeded_partition(keys, [fraction, 1 - fraction], seed)
    if not held_out or not kept:
        msg = (
            f"val_split_ratio={ratio} of {len(keys)} training images under '{root}' leaves "
            f"{len(kept)} to train and {len(held_out)} to validate; both need at least one image"
        )
        raise ValueError(msg)
    return dataset.subsample([keys[key] for key in kept]), dataset.subsample([keys[key] for key in held_out])


def synthetic_validation(normal_val: AnomalibDataset, seed: int) -> AnomalibDataset:
    """Build anomalib's synthetic validation set, loaded like every other split of the dataset.

    anomalib's ``SyntheticAnomalyDataset`` picks the half to corrupt with numpy's and torch's global generators; it
    runs here under a fork of both seeded with ``seed``, so the synthetic images do not depend on the training's
    random state. It writes the corrupted half to a temporary folder that it deletes when it is garbage-collected,
    so the returned dataset keeps it as ``synthetic_source``. Its items are read with the dataset's own loader
    (EXIF orientation, 16-bit scaling), not anomalib's, so held-out normals score exactly as the test normals would.
    """
    with seeded_global_rngs(seed):
        source = SyntheticAnomalyDataset.from_dataset(normal_val)
    samples = source.samples.copy()
    samples["mask_paths"] = [(path,) if path else () for path in samples.mask_path.fillna("")]
    samples["mask_path"] = samples.mask_path.fillna("")
    samples.attrs["task"] = TaskType.SEGMENTATION.value
    val_data = normal_val.subsample([])
    val_data.samples = samples.reset_index(drop=True)
    val_data.synthetic_source = source
    return val_data


def _counts(dataset: AnomalibDataset | None) -> tuple[int, int]:
    if dataset is None:
        return 0, 0
    abnormal = int((dataset.samples.label_index == LabelName.ABNORMAL).sum())
    return len(dataset.samples) - abnormal, abnormal


def describe_protocol(
    val_split_mode: ValSplitMode | str,
    val_split_ratio: float,
    seed: int,
    splits: tuple[AnomalibDataset | None, AnomalibDataset | None, AnomalibDataset | None],
) -> dict[str, Any]:
    """Protocol in force and the image counts of the (train, validation, test) splits, as setup prints them."""
    (train_normal, _), (val_normal, val_abnormal), (test_normal, test_abnormal) = (_counts(d) for d in splits)
    protocol = {
        "val_split_mode": getattr(val_split_mode, "value", val_split_mode),
        "val_split_ratio": val_split_ratio if val_split_mode in RATIO_MODES else None,
        "seed": seed,
        "train_normal": train_normal,
        "val_normal": val_normal,
        "val_abnormal": val_abnormal,
        "test_normal": test_normal,
        "test_abnormal": test_abnormal,
    }
    if val_split_mode in (ValSplitMode.SAME_AS_TEST, ValSplitMode.FROM_TEST):
        protocol["note"] = "validation images are test images: thresholds are test-calibrated"
    elif val_split_mode == CROSSFIT:
        protocol["note"] = "thresholds from out-of-fold scores of the training normals (CrossFitThreshold)"
    return protocol


def write_protocol(trainer: Trainer | None, protocol: dict[str, Any]) -> None:
    """Save ``protocol`` as :data:`PROTOCOL_FILE` in the trainer's run folder (rank zero; nothing without one)."""
    if trainer is None or not trainer.is_global_zero:
        return
    folder = Path(trainer.default_root_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROTOCOL_FILE).write_text(json.dumps(protocol, indent=2) + "\n")
