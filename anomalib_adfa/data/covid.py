"""Covid: Kaggle's "COVID-19 Xray Dataset (Train & Test Sets)", with its official split.

Layout of the download (``train.csv``/``test.csv`` sheets beside the folders are ignored)::

    xray_dataset_covid19/
    ├── train/
    │   ├── NORMAL/       74 images
    │   └── PNEUMONIA/    unused
    └── test/
        ├── NORMAL/       20 images
        └── PNEUMONIA/    20 images

Split rule: the official folders. ``train/NORMAL`` trains; ``test/NORMAL`` (normal) and
``test/PNEUMONIA`` (abnormal) test, as in the paper's Table 2 (74 / 20 / 20). The seed does not
change this split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib.data.utils import Split

from anomalib_adfa.data.base import Assignment, MedicalDataModule, MedicalDataset
from anomalib_adfa.data.layout import DatasetLayout

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anomalib_adfa.data.layout import ImageEntry

LAYOUT = DatasetLayout(
    name="Covid",
    folders=("train/NORMAL", "test/NORMAL", "test/PNEUMONIA"),
    tree=(
        "  xray_dataset_covid19/\n"
        "  ├── train/\n"
        "  │   ├── NORMAL/      normal chest X-rays (74)\n"
        "  │   └── PNEUMONIA/   (not used)\n"
        "  └── test/\n"
        "      ├── NORMAL/      normal chest X-rays (20)\n"
        "      └── PNEUMONIA/   COVID-19 pneumonia (20)"
    ),
    source="https://www.kaggle.com/datasets/khoongweihao/covid19-xray-dataset-train-test-sets",
)


class CovidDataset(MedicalDataset):
    """Covid chest X-rays with the official split; see the module docstring for the layout.

    Args:
        root: The unzipped download (``xray_dataset_covid19/``), or the folder that contains it.
        split: Keep only this split; ``None`` keeps both.
        seed: Unused by this split (kept for a uniform interface).
        check_images: Check every file is readable and report all bad ones at once.
        augmentations: Augmentations applied to each item.
    """

    layout = LAYOUT

    def _assign(self, images: Mapping[str, Sequence[ImageEntry]]) -> list[Assignment]:
        return [
            *self._assign_all(images["train/NORMAL"], normal=True, split=Split.TRAIN),
            *self._assign_all(images["test/NORMAL"], normal=True, split=Split.TEST),
            *self._assign_all(images["test/PNEUMONIA"], normal=False, split=Split.TEST),
        ]


class Covid(MedicalDataModule):
    """Covid datamodule: ``train/NORMAL`` trains; ``test/NORMAL`` and ``test/PNEUMONIA`` test.

    Example:
        >>> datamodule = Covid(root="~/data/xray_dataset_covid19")
        >>> datamodule.setup()
        >>> len(datamodule.train_data), len(datamodule.test_data)
        (74, 40)
    """

    dataset_class = CovidDataset
