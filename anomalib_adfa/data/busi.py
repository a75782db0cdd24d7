"""BUSI: "Breast Ultrasound Images Dataset" (Dataset_BUSI_with_GT), with the ADFA paper's split and masks.

Layout of the download (masks beside their images; a few images have extra masks ``_mask_1``,
``_mask_2``)::

    Dataset_BUSI_with_GT/
    ├── normal/      133 images: normal (1).png, normal (1)_mask.png, ...
    ├── benign/      437 images: benign (12).png, benign (12)_mask.png, benign (12)_mask_1.png, ...
    └── malignant/   210 images

Split rule (the paper's Table 2: 96 train normal, 32 test normal, 496 test abnormal):

- normal images: a seeded ``96/133`` trains and another ``32/133`` tests; the remaining ``5/133`` are
  unused (96, 32 and 5 of the full 133);
- abnormal images: benign and malignant together; with ``abnormal="paper"`` a seeded ``496/647`` of
  them test (496 of 647), with ``abnormal="all"`` all of them do.

Masks: an abnormal image's mask is the union of its ``_mask`` and ``_mask_N`` files, each read as
"convert to L, > 0" (lesion masks are 1-bit, the normal images' masks 8-bit RGB). Normal images get an
empty mask. Copies with no mask files at all are classification datasets.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

from anomalib.data.utils import Split, ValSplitMode

from anomalib_adfa.data.base import DEFAULT_SEED, Assignment, MedicalDataModule, MedicalDataset
from anomalib_adfa.data.layout import DatasetLayout

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from torchvision.transforms.v2 import Transform

    from anomalib_adfa.data.layout import ImageEntry

TRAIN_FRACTION = Fraction(96, 133)
TEST_NORMAL_FRACTION = Fraction(32, 133)
TEST_ABNORMAL_FRACTION = Fraction(496, 647)

LAYOUT = DatasetLayout(
    name="BUSI",
    folders=("normal", "benign", "malignant"),
    tree=(
        "  Dataset_BUSI_with_GT/\n"
        "  ├── normal/      'normal (1).png' ... (133), masks 'normal (1)_mask.png' beside them\n"
        "  ├── benign/      'benign (1).png' ... (437), masks '_mask.png' and '_mask_1.png'\n"
        "  └── malignant/   'malignant (1).png' ... (210), masks as in benign/"
    ),
    source=(
        "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset "
        "(mirror: https://www.kaggle.com/datasets/aryashah2k/breast-ultrasound-images-dataset)"
    ),
)


class BUSIDataset(MedicalDataset):
    """BUSI images with the paper's split and union masks; see the module docstring.

    Args:
        root: The unzipped download (``Dataset_BUSI_with_GT/``), or the folder that contains it.
        split: Keep only this split; ``None`` keeps both.
        seed: Seed choosing the normal training and test images and the 496 abnormal test images.
        check_images: Check every image and mask file is readable and report all bad ones at once.
        augmentations: Augmentations applied to each item (and its mask).
        abnormal: ``"paper"``: a seeded 496/647 of the benign and malignant images test; ``"all"``: all do.
    """

    layout = LAYOUT

    def __init__(
        self,
        root: str | Path,
        split: str | Split | None = None,
        seed: int = DEFAULT_SEED,
        check_images: bool = True,
        augmentations: Transform | None = None,
        abnormal: Literal["paper", "all"] = "paper",
    ) -> None:
        if abnormal not in {"paper", "all"}:
            msg = f"abnormal must be 'paper' or 'all', got {abnormal!r}"
            raise ValueError(msg)
        self.abnormal = abnormal
        super().__init__(root=root, split=split, seed=seed, check_images=check_images, augmentations=augmentations)

    def _assign(self, images: Mapping[str, Sequence[ImageEntry]]) -> list[Assignment]:
        train, test = self._partition(images["normal"], [TRAIN_FRACTION, TEST_NORMAL_FRACTION])
        abnormal = [*images["benign"], *images["malignant"]]
        if self.abnormal == "paper":
            (abnormal,) = self._partition(abnormal, [TEST_ABNORMAL_FRACTION])
        return [
            *self._assign_all(train, normal=True, split=Split.TRAIN),
            *self._assign_all(test, normal=True, split=Split.TEST),
            *self._assign_all(abnormal, normal=False, split=Split.TEST),
        ]


class BUSI(MedicalDataModule):
    """BUSI datamodule: 96 normal training images; 32 normal and 496 abnormal test images, with masks.

    Args:
        root: The unzipped download (``Dataset_BUSI_with_GT/``), or the folder that contains it.
        abnormal: ``"paper"`` (default): a seeded 496 of the 647 benign and malignant images test;
            ``"all"``: all 647 do.
        seed: Seed of the train/test split (the paper's first seed by default).
        check_images: Decode-check every image and mask file at setup.
        train_batch_size: Batch size of the train dataloader.
        eval_batch_size: Batch size of the validation and test dataloaders.
        num_workers: Dataloader worker processes (``0``: load in the main process).
        train_augmentations: Augmentations of training images.
        val_augmentations: Augmentations of validation images.
        test_augmentations: Augmentations of test images.
        augmentations: Augmentations of any split without its own.
        val_split_mode: Validation protocol, ``from_train`` by default (see
            :class:`~anomalib_adfa.data.base.MedicalDataModule`; not ``from_dir``).
        val_split_ratio: Fraction used by the ``from_test``, ``from_train`` and ``synthetic`` modes.

    Example:
        >>> datamodule = BUSI(root="~/data/Dataset_BUSI_with_GT")
        >>> datamodule.setup()
        >>> datamodule.test_data.samples.label_index.value_counts().to_dict()
        {1: 496, 0: 32}
    """

    dataset_class = BUSIDataset

    def __init__(
        self,
        root: str | Path,
        abnormal: Literal["paper", "all"] = "paper",
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
        super().__init__(
            root=root,
            seed=seed,
            check_images=check_images,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
        )
        self.abnormal = abnormal

    def _dataset_options(self) -> dict[str, Any]:
        return {"abnormal": self.abnormal}
