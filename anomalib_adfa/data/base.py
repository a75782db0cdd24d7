"""Shared dataset and datamodule for the medical datasets read from their public downloads.

A dataset module only declares its layout and its split rule (:meth:`MedicalDataset._assign`);
finding the folders, listing the images and their masks, checking the files, building anomalib's
samples table and loading items happen here.

The validation protocols (``val_split_mode``: ``from_train``, ``synthetic``, ``crossfit``, ``same_as_test``) are
described and built in :mod:`anomalib_adfa.data.protocols`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from anomalib import TaskType
from anomalib.data.dataclasses import ImageItem
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from pandas import DataFrame
from torchvision.tv_tensors import Mask

from anomalib_adfa.data.dicom import ReadOptions
from anomalib_adfa.data.image import check_readable, load_image, load_mask
from anomalib_adfa.data.layout import DatasetLayout, ImageEntry, layout_error, list_images, locate_folders
from anomalib_adfa.data.protocols import (
    CROSSFIT,
    RATIO_MODES,
    describe_protocol,
    hold_out_normals,
    synthetic_validation,
    write_protocol,
)
from anomalib_adfa.data.split import seeded_partition

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from torchvision.transforms.v2 import Transform

logger = logging.getLogger(__name__)

DEFAULT_SEED = 1024
"""Default split seed: the first of the seeds (1024, 213, 317) used by the ADFA paper's code.

Every seed gives the paper's counts; the seed only chooses which images fill them.
"""


class Assignment(NamedTuple):
    """Where one image goes: its class, label and split."""

    entry: ImageEntry
    label: str
    label_index: LabelName
    split: Split


class MedicalDataset(AnomalibDataset, ABC):
    """Images of one medical dataset, read from its public folder layout, with the paper's split.

    Subclasses set :attr:`layout` and implement :meth:`_assign`.

    Args:
        root: The unzipped download, or the folder that contains it.
        split: Keep only this split (``"train"`` or ``"test"``); ``None`` keeps both.
        seed: Seed of the split (default 1024, the first of the paper's seeds); see :data:`DEFAULT_SEED`.
        check_images: Decode-check every image and mask file here, and report all unreadable ones in one
            :class:`~anomalib_adfa.data.errors.CorruptImageError`.
        augmentations: Augmentations applied to each item.

    Raises:
        DatasetLayoutError: When the root does not hold the dataset's class folders, a class folder has no
            images, there are too few images to fill every split, or some abnormal images have masks and
            others do not.
        CorruptImageError: When ``check_images`` is set and some files cannot be read.
    """

    layout: ClassVar[DatasetLayout]
    read_options: ReadOptions = ReadOptions()
    """How DICOM files are windowed and which frame is read (see :class:`~anomalib_adfa.data.dicom.ReadOptions`)."""

    def __init__(
        self,
        root: str | Path,
        split: str | Split | None = None,
        seed: int = DEFAULT_SEED,
        check_images: bool = True,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.seed = seed
        self.root, folders = locate_folders(root, self.layout, self._required_folders())
        images = {name: list_images(path, name) for name, path in folders.items()}
        empty = [f"'{folders[name]}'" for name, entries in images.items() if not entries]
        if empty:
            found = "  no images in " + ", ".join(empty)
            raise layout_error(self.root, self.layout, found, problem=f"empty class folder(s) under '{self.root}'")

        samples = self._samples_table(self._assign(images))
        self._check_split_sizes(samples, images)
        if check_images:
            _check_files(samples, self.read_options)
        if split is not None:
            split = Split(split)
            samples = samples[samples.split == split.value].reset_index(drop=True)
        self.split = split
        self.samples = samples

    def _required_folders(self) -> tuple[str, ...]:
        """Class folders that must exist with the current options (all of the layout's by default)."""
        return self.layout.folders

    @abstractmethod
    def _assign(self, images: Mapping[str, Sequence[ImageEntry]]) -> list[Assignment]:
        """Apply the dataset's split rule.

        Args:
            images: The images of each required class folder, keyed by the folder's name in the layout.

        Returns:
            The images used, each with its label and split; images not returned are unused.
        """

    def _partition(self, entries: Iterable[ImageEntry], fractions: Sequence[Fraction]) -> list[list[ImageEntry]]:
        """Seeded split of entries into parts holding the given fractions of them (see :mod:`.split`)."""
        by_key = {entry.key: entry for entry in entries}
        return [[by_key[key] for key in part] for part in seeded_partition(by_key, fractions, self.seed)]

    @staticmethod
    def _assign_all(entries: Iterable[ImageEntry], normal: bool, split: Split) -> list[Assignment]:
        """Assign entries to one split; each is labelled with the last part of its class folder's name."""
        label_index = LabelName.NORMAL if normal else LabelName.ABNORMAL
        return [Assignment(entry, entry.folder.rsplit("/", 1)[-1], label_index, split) for entry in entries]

    def _check_split_sizes(self, samples: DataFrame, images: Mapping[str, Sequence[ImageEntry]]) -> None:
        """Refuse splits that cannot be trained or evaluated: too few images for the split rule."""
        groups = {
            "normal training": (samples.split == Split.TRAIN.value) & (samples.label_index == LabelName.NORMAL),
            "normal test": (samples.split == Split.TEST.value) & (samples.label_index == LabelName.NORMAL),
            "abnormal test": (samples.split == Split.TEST.value) & (samples.label_index == LabelName.ABNORMAL),
        }
        missing = [name for name, rows in groups.items() if not rows.any()]
        if missing:
            counts = ", ".join(f"{name}/: {len(entries)}" for name, entries in images.items())
            found = f"  images per class folder: {counts}"
            problem = f"too few images under '{self.root}' to make {' and '.join(missing)} images"
            raise layout_error(self.root, self.layout, found, problem=problem)

    def _samples_table(self, assignments: list[Assignment]) -> DataFrame:
        """Build anomalib's samples table; abnormal images' masks make it a segmentation dataset."""
        abnormal = [a for a in assignments if a.label_index == LabelName.ABNORMAL]
        unmasked = [a.entry.path.name for a in abnormal if not a.entry.masks]
        if unmasked and len(unmasked) < len(abnormal):
            found = f"  {len(unmasked)} abnormal image(s) without a mask file, e.g. {', '.join(sorted(unmasked)[:10])}"
            raise layout_error(self.root, self.layout, found, problem="some abnormal images have masks, others not")
        segmentation = bool(abnormal) and not unmasked

        def masks(assignment: Assignment) -> tuple[str, ...]:
            keep = segmentation and assignment.label_index == LabelName.ABNORMAL
            return tuple(str(path) for path in assignment.entry.masks) if keep else ()

        mask_paths = [masks(a) for a in assignments]
        samples = DataFrame(
            {
                "image_path": [str(a.entry.path) for a in assignments],
                "label": [a.label for a in assignments],
                "label_index": [int(a.label_index) for a in assignments],
                "split": [a.split.value for a in assignments],
                "mask_path": [paths[0] if paths else "" for paths in mask_paths],
                "mask_paths": mask_paths,
            }
        )
        samples.attrs["task"] = TaskType.SEGMENTATION.value if segmentation else TaskType.CLASSIFICATION.value
        return samples

    def __getitem__(self, index: int) -> ImageItem:
        """Load one item: the image as 3 channels, and for segmentation the union of its masks.

        Args:
            index: Row of the samples table.

        Returns:
            The item, with an empty mask for normal images of a segmentation dataset.
        """
        sample = self.samples.iloc[index]
        image = load_image(sample.image_path, self.read_options)
        gt_mask = None
        if self.task == TaskType.SEGMENTATION:
            size = (image.shape[-2], image.shape[-1])
            if sample.mask_paths:
                gt_mask = load_mask(sample.mask_paths, size)
            else:
                gt_mask = Mask(torch.zeros(size, dtype=torch.uint8))

        if self.augmentations:
            if gt_mask is None:
                image = self.augmentations(image)
            else:
                image, gt_mask = self.augmentations(image, gt_mask)

        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=torch.tensor(sample.label_index),
            image_path=sample.image_path,
            mask_path=sample.mask_path,
        )


def _check_files(samples: DataFrame, options: ReadOptions) -> None:
    """Read-check every image and mask file of a samples table, and mask sizes (see :func:`.image.check_readable`)."""
    images = [Path(path) for path in samples.image_path]
    masks = {image: [Path(path) for path in paths] for image, paths in zip(images, samples.mask_paths, strict=True)}
    check_readable([*images, *(mask for paths in masks.values() for mask in paths)], options, masks)


class MedicalDataModule(AnomalibDataModule):
    """Datamodule for a :class:`MedicalDataset`: the paper's train and test splits, and a validation set.

    Args:
        root: The unzipped download, or the folder that contains it.
        seed: Seed of the train/test split. The default, 1024, is the first of the ADFA paper's seeds
            (1024, 213, 317); every seed gives the paper's counts, the seed only picks the images. Also
            used by anomalib's ``from_test``/``from_train``/``synthetic`` validation modes.
        check_images: Decode-check every image and mask file at setup, and report all unreadable ones at once.
        train_batch_size: Batch size of the train dataloader.
        eval_batch_size: Batch size of the validation and test dataloaders.
        num_workers: Dataloader worker processes. ``0`` (load in the main process) by default: on small
            machines worker processes oversubscribe the cores and slow feature-based models down.
        train_augmentations: Augmentations of training images.
        val_augmentations: Augmentations of validation images.
        test_augmentations: Augmentations of test images.
        augmentations: Augmentations of any split without its own.
        val_split_mode: Validation protocol (see the module docstring): ``from_train`` (default; held-out
            training normals), ``synthetic`` (held-out normals, half turned into synthetic anomalies),
            ``crossfit`` (no hold-out; threshold from out-of-fold scores, with
            :class:`~anomalib_adfa.evaluation.crossfit.CrossFitThreshold`),
            ``same_as_test`` (the paper's; reproduces Table 1, its thresholds are test-calibrated),
            ``from_test`` or ``none``.
        val_split_ratio: Fraction of the training normals held out by ``from_train`` and ``synthetic`` (of the
            test images for ``from_test``).

    Raises:
        ValueError: For ``val_split_mode="from_dir"`` (these datasets have no validation folder), or a
            ``val_split_ratio`` outside (0, 1) for a mode that uses it.
    """

    dataset_class: ClassVar[type[MedicalDataset]]

    def __init__(
        self,
        root: str | Path,
        seed: int = DEFAULT_SEED,
        check_images: bool = True,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.FROM_TRAIN,
        val_split_ratio: float = 0.5,
    ) -> None:
        crossfit = getattr(val_split_mode, "value", val_split_mode) == CROSSFIT
        val_split_mode = ValSplitMode.NONE if crossfit else ValSplitMode(val_split_mode)
        if val_split_mode == ValSplitMode.FROM_DIR:
            msg = (
                f"{type(self).__name__} has no validation folder; use from_train, synthetic, crossfit, same_as_test, "
                "from_test or none"
            )
            raise ValueError(msg)
        if val_split_mode in RATIO_MODES and not 0 < val_split_ratio < 1:
            msg = f"val_split_ratio must be in (0, 1) for val_split_mode={val_split_mode.value}, got {val_split_ratio}"
            raise ValueError(msg)
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            test_split_mode=TestSplitMode.FROM_DIR,
            seed=seed,
        )
        self.root = Path(root)
        self.check_images = check_images
        if crossfit:
            # anomalib's enum has no such member; every comparison with its members is False, as for ``none``.
            self.val_split_mode: ValSplitMode | str = CROSSFIT

    def _dataset_options(self) -> dict[str, Any]:
        """Dataset-specific options passed to :attr:`dataset_class`."""
        return {}

    def _setup(self, _stage: str | None = None) -> None:
        dataset = self.dataset_class(
            root=self.root,
            seed=self.seed,
            check_images=self.check_images,
            **self._dataset_options(),
        )
        samples = dataset.samples
        self.train_data = dataset.subsample(list(samples.index[samples.split == Split.TRAIN.value]))
        self.test_data = dataset.subsample(list(samples.index[samples.split == Split.TEST.value]))
        self.train_data.split = Split.TRAIN
        self.test_data.split = Split.TEST

    def _create_val_split(self) -> None:
        """Create anomalib's validation split, with a seeded, machine-independent hold-out of training normals.

        See :mod:`anomalib_adfa.data.protocols`: :func:`~anomalib_adfa.data.protocols.hold_out_normals` and
        :func:`~anomalib_adfa.data.protocols.synthetic_validation`.
        """
        if self.val_split_mode == CROSSFIT:
            pass  # no validation set: CrossFitThreshold fits the post-processor on out-of-fold scores
        elif self.val_split_mode not in (ValSplitMode.FROM_TRAIN, ValSplitMode.SYNTHETIC):
            super()._create_val_split()
        else:
            self.train_data, normal_val = hold_out_normals(self.train_data, self.val_split_ratio, self.seed, self.root)
            self.val_data = (
                normal_val
                if self.val_split_mode == ValSplitMode.FROM_TRAIN
                else synthetic_validation(normal_val, self.seed)
            )
            self.val_data.split = Split.VAL
        splits = tuple(getattr(self, name, None) for name in ("train_data", "val_data", "test_data"))
        self.protocol = describe_protocol(self.val_split_mode, self.val_split_ratio, self.seed, splits)
        summary = ", ".join(f"{key} {value}" for key, value in self.protocol.items())
        logger.info("%s: %s", type(self).__name__, summary)
        print(f"{type(self).__name__}: {summary}")
        write_protocol(getattr(self, "trainer", None), self.protocol)

    def val_dataloader(self) -> Any:
        """Return anomalib's validation loader; under ``crossfit`` an error saying which callback fits the threshold."""
        if self.val_split_mode == CROSSFIT:
            msg = (
                f"{type(self).__name__}(val_split_mode='crossfit') has no validation set: its threshold comes from "
                "out-of-fold scores. Add --trainer.callbacks+=anomalib_adfa.callbacks.CrossFitThreshold (Engine: "
                "callbacks=[CrossFitThreshold()]), or choose val_split_mode from_train"
            )
            raise RuntimeError(msg)
        return super().val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """Return what Lightning stores in checkpoints for this datamodule: the validation protocol and counts."""
        return {"protocol": dict(getattr(self, "protocol", {}))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the protocol a checkpoint was trained with as :attr:`trained_protocol` (the splits are rebuilt)."""
        self.trained_protocol = dict(state_dict.get("protocol", {}))
