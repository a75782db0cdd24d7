"""SIPaKMeD: Pap-smear cell cluster images, with the ADFA paper's split.

Layout of the download (one zip per class; some unpack as ``im_X/im_X/``)::

    <root>/
    ├── im_Dyskeratotic/                223 cluster images 001.bmp, 002.bmp, ...; CROPPED/ and *.dat ignored
    ├── im_Koilocytotic/                238
    ├── im_Metaplastic/                 excluded by default
    ├── im_Parabasal/                   108
    └── im_Superficial-Intermediate/    126

Only the whole-slide cluster images directly in each class folder are used, not the per-cell crops in
``CROPPED/`` nor the ``.dat`` cell boundaries.

Split rule (the paper's Table 2: 180 train normal, 54 test normal, 461 test abnormal): Parabasal and
Superficial-Intermediate are normal; a seeded ``180/234`` of them train (180 of 234), the rest test.
Dyskeratotic and Koilocytotic are abnormal and all test (461). Metaplastic (benign, but left out of the
paper's protocol) is excluded unless ``include_metaplastic=True``, which adds it to the abnormal test
images.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any

from anomalib.data.utils import Split, ValSplitMode

from anomalib_adfa.data.base import DEFAULT_SEED, Assignment, MedicalDataModule, MedicalDataset
from anomalib_adfa.data.layout import DatasetLayout

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from torchvision.transforms.v2 import Transform

    from anomalib_adfa.data.layout import ImageEntry

TRAIN_FRACTION = Fraction(180, 234)
NORMAL_FOLDERS = ("im_Parabasal", "im_Superficial-Intermediate")
ABNORMAL_FOLDERS = ("im_Dyskeratotic", "im_Koilocytotic")
METAPLASTIC_FOLDER = "im_Metaplastic"

LAYOUT = DatasetLayout(
    name="SIPaKMeD",
    folders=(*NORMAL_FOLDERS, *ABNORMAL_FOLDERS, METAPLASTIC_FOLDER),
    tree=(
        "  <root>/   (each class folder may be nested twice: im_X/im_X/)\n"
        "  ├── im_Dyskeratotic/               001.bmp, 002.bmp, ... (223), CROPPED/, *.dat\n"
        "  ├── im_Koilocytotic/               (238)\n"
        "  ├── im_Metaplastic/                (only needed with include_metaplastic=True)\n"
        "  ├── im_Parabasal/                  (108)\n"
        "  └── im_Superficial-Intermediate/   (126)"
    ),
    source="https://www.cs.uoi.gr/~marina/sipakmed.html",
)


class SIPaKMeDDataset(MedicalDataset):
    """SIPaKMeD cluster images with the paper's split; see the module docstring.

    Args:
        root: The folder holding the ``im_*`` class folders, or the folder that contains it.
        split: Keep only this split; ``None`` keeps both.
        seed: Seed choosing the 180 training images.
        check_images: Check every file is readable and report all bad ones at once.
        augmentations: Augmentations applied to each item.
        include_metaplastic: Add ``im_Metaplastic`` to the abnormal test images (and require its folder).
    """

    layout = LAYOUT

    def __init__(
        self,
        root: str | Path,
        split: str | Split | None = None,
        seed: int = DEFAULT_SEED,
        check_images: bool = True,
        augmentations: Transform | None = None,
        include_metaplastic: bool = False,
    ) -> None:
        self.include_metaplastic = include_metaplastic
        super().__init__(root=root, split=split, seed=seed, check_images=check_images, augmentations=augmentations)

    def _required_folders(self) -> tuple[str, ...]:
        extra = (METAPLASTIC_FOLDER,) if self.include_metaplastic else ()
        return (*NORMAL_FOLDERS, *ABNORMAL_FOLDERS, *extra)

    def _assign(self, images: Mapping[str, Sequence[ImageEntry]]) -> list[Assignment]:
        normal = [entry for folder in NORMAL_FOLDERS for entry in images[folder]]
        train, test = self._partition(normal, [TRAIN_FRACTION, 1 - TRAIN_FRACTION])
        abnormal_folders = [folder for folder in self._required_folders() if folder not in NORMAL_FOLDERS]
        abnormal = [entry for folder in abnormal_folders for entry in images[folder]]
        return [
            *self._assign_all(train, normal=True, split=Split.TRAIN),
            *self._assign_all(test, normal=True, split=Split.TEST),
            *self._assign_all(abnormal, normal=False, split=Split.TEST),
        ]


class SIPaKMeD(MedicalDataModule):
    """SIPaKMeD datamodule: 180 normal training images; 54 normal and 461 abnormal test images.

    Args:
        root: The folder holding the ``im_*`` class folders, or the folder that contains it.
        include_metaplastic: Add ``im_Metaplastic`` to the abnormal test images (default: excluded, as in
            the paper).
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
        >>> datamodule = SIPaKMeD(root="~/data/sipakmed")
        >>> datamodule.setup()
        >>> len(datamodule.train_data)
        180
    """

    dataset_class = SIPaKMeDDataset

    def __init__(
        self,
        root: str | Path,
        include_metaplastic: bool = False,
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
        self.include_metaplastic = include_metaplastic

    def _dataset_options(self) -> dict[str, Any]:
        return {"include_metaplastic": self.include_metaplastic}
