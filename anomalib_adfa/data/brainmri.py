"""BrainMRI: Kaggle's "Brain MRI Images for Brain Tumor Detection", with the ADFA paper's split.

Layout of the download (``no/`` normal, ``yes/`` tumour; JPEG and PNG of mixed sizes)::

    brain_tumor_dataset/
    ├── no/     98 images
    └── yes/    155 images

The dataset has no official split. Split rule: a seeded ``58/98`` of the ``no`` images train (58 of 98),
the other ``no`` images and every ``yes`` image test (40 normal, 155 abnormal), as in the paper's Table 2.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

from anomalib.data.utils import Split

from anomalib_adfa.data.base import Assignment, MedicalDataModule, MedicalDataset
from anomalib_adfa.data.layout import DatasetLayout

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anomalib_adfa.data.layout import ImageEntry

TRAIN_FRACTION = Fraction(58, 98)

LAYOUT = DatasetLayout(
    name="BrainMRI",
    folders=("no", "yes"),
    tree=(
        "  brain_tumor_dataset/\n"
        "  ├── no/    normal MRI slices (98 in the full set)\n"
        "  └── yes/   slices with a tumour (155)"
    ),
    source="https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection",
)


class BrainMRIDataset(MedicalDataset):
    """BrainMRI images with the paper's split; see the module docstring for the layout and the rule.

    Args:
        root: The unzipped download (``brain_tumor_dataset/``), or the folder that contains it.
        split: Keep only this split; ``None`` keeps both.
        seed: Seed choosing the 58 training images.
        check_images: Check every file is readable and report all bad ones at once.
        augmentations: Augmentations applied to each item.
    """

    layout = LAYOUT

    def _assign(self, images: Mapping[str, Sequence[ImageEntry]]) -> list[Assignment]:
        train, test = self._partition(images["no"], [TRAIN_FRACTION, 1 - TRAIN_FRACTION])
        return [
            *self._assign_all(train, normal=True, split=Split.TRAIN),
            *self._assign_all(test, normal=True, split=Split.TEST),
            *self._assign_all(images["yes"], normal=False, split=Split.TEST),
        ]


class BrainMRI(MedicalDataModule):
    """BrainMRI datamodule: 58 normal training images; 40 normal and 155 tumour test images.

    Example:
        >>> datamodule = BrainMRI(root="~/data/brain_tumor_dataset")
        >>> datamodule.setup()
        >>> len(datamodule.train_data)
        58
    """

    dataset_class = BrainMRIDataset
