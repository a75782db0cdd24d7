"""Your own images: folders of normal and abnormal images (DICOM, 16-bit or 8-bit), and folders to predict on.

:class:`MedicalFolder` is anomalib's ``Folder`` idea on top of :class:`~anomalib_adfa.data.base.MedicalDataModule`:
the same file check before training (every unreadable file listed at once), the same validation modes
and errors as the paper's datasets, and the one image reader (:func:`~anomalib_adfa.data.image.load_image`),
so DICOM files are windowed as a viewer shows them. Folders are given relative to ``root`` (or absolute)::

    scans/
    ├── normal/          training (and, without normal_test_dir, held-out test) images
    ├── normal_test/     optional normal test images
    ├── abnormal/        abnormal test images
    └── masks/           optional masks of the abnormal images: <image stem>.png or <image stem>_mask.png

Split rule: every image in ``normal_dir`` trains, unless there is no ``normal_test_dir``; then a seeded
``normal_split_ratio`` of them (see :mod:`.split`) tests instead. Every abnormal image tests.

For prediction, ``predict_dir`` (files or folders, searched recursively) is read through the same reader
and is what ``predict_dataloader`` returns; with only ``predict_dir`` no training folders are needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from anomalib.data import ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import Split
from anomalib.utils.attrs import get_nested_attr
from torch.utils.data import DataLoader

from anomalib_adfa.data.base import DEFAULT_SEED, Assignment, MedicalDataModule, MedicalDataset
from anomalib_adfa.data.dicom import ReadOptions
from anomalib_adfa.data.errors import DatasetLayoutError
from anomalib_adfa.data.image import check_options_apply, check_readable, load_image
from anomalib_adfa.data.layout import DatasetLayout, ImageEntry, find_folder, find_image_files, is_image_file

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torchvision.transforms.v2 import Transform

Folders = str | Path | Sequence[str | Path]
_ROLES = ("normal", "abnormal", "normal_test")


def _as_list(folders: Folders | None) -> list[Path]:
    if folders is None:
        return []
    if isinstance(folders, str | Path):
        return [Path(folders)]
    return [Path(folder) for folder in folders]


def resolve_folders(
    root: str | Path | None, folders: Mapping[str, Folders | None]
) -> tuple[Path, dict[str, list[str]]]:
    """Express every folder relative to one root.

    Args:
        root: Folder the relative folders are in; ``None`` takes the deepest folder holding all of them
            (they must then be absolute).
        folders: Folders of each role (``"normal"``, ``"abnormal"``, ...), relative to ``root`` or absolute.

    Returns:
        The root, and each role's folders as ``/``-separated paths relative to it.

    Raises:
        ValueError: When a relative folder is given without a root, or a folder is outside the root.
    """
    given = {role: _as_list(paths) for role, paths in folders.items()}
    everything = [path for paths in given.values() for path in paths]
    if root is None:
        relative = [str(path) for path in everything if not path.is_absolute()]
        if relative:
            msg = f"MedicalFolder: relative folder(s) {', '.join(relative)} need a root"
            raise ValueError(msg)
        if not everything:
            msg = "MedicalFolder: give normal_dir (with abnormal_dir) to train and test, or predict_dir to predict"
            raise ValueError(msg)
        root = os.path.commonpath([str(path) for path in everything])
    root = Path(os.path.abspath(Path(root).expanduser()))
    named: dict[str, list[str]] = {}
    for role, paths in given.items():
        named[role] = []
        for path in paths:
            absolute = Path(os.path.abspath(root / path.expanduser()))
            if absolute != root and root not in absolute.parents:
                msg = f"MedicalFolder: {role}_dir '{path}' is not inside root '{root}'"
                raise ValueError(msg)
            named[role].append(absolute.relative_to(root).as_posix() if absolute != root else ".")
    return root, named


def _tree(folders: Mapping[str, Sequence[str]]) -> str:
    lines = [f"  <root>/{name}/   {role} images" for role, names in folders.items() for name in names]
    return "\n".join(lines)


class MedicalFolderDataset(MedicalDataset):
    """Images of your own folders with the split rule of :mod:`anomalib_adfa.data.folder`.

    Args:
        root: Folder holding the image folders; ``None`` when they are all absolute.
        normal_dir: Folder(s) of normal images.
        abnormal_dir: Folder(s) of abnormal (test) images.
        normal_test_dir: Folder(s) of normal test images; without them a seeded ``normal_split_ratio`` of
            ``normal_dir`` tests.
        mask_dir: Folder of masks of the abnormal images, named ``<image stem>.<ext>`` or
            ``<image stem>_mask.<ext>``; masks beside their images (``<stem>_mask.png``) are found too.
        normal_split_ratio: Fraction of ``normal_dir`` that tests when there is no ``normal_test_dir``.
        split: Keep only this split; ``None`` keeps both.
        seed: Seed of the normal train/test split.
        check_images: Read every image and mask before use and report all bad files at once.
        augmentations: Augmentations applied to each item (and its mask).
        read_options: DICOM window and frame choices.

    Raises:
        DatasetLayoutError: When a folder is missing or empty, or there are too few images for each split.
        CorruptImageError: When ``check_images`` is set and some files cannot be read or a mask's size differs
            from its image's.
    """

    def __init__(
        self,
        root: str | Path | None,
        normal_dir: Folders,
        abnormal_dir: Folders,
        normal_test_dir: Folders | None = None,
        mask_dir: str | Path | None = None,
        normal_split_ratio: float = 0.2,
        split: str | Split | None = None,
        seed: int = DEFAULT_SEED,
        check_images: bool = True,
        augmentations: Transform | None = None,
        read_options: ReadOptions | None = None,
    ) -> None:
        if not 0 < normal_split_ratio < 1:
            msg = f"normal_split_ratio must be in (0, 1), got {normal_split_ratio}"
            raise ValueError(msg)
        root, self.folders = resolve_folders(
            root, {"normal": normal_dir, "abnormal": abnormal_dir, "normal_test": normal_test_dir, "mask": mask_dir}
        )
        image_folders = {role: self.folders[role] for role in _ROLES}
        self.layout = DatasetLayout(
            name="MedicalFolder",
            folders=tuple(name for names in image_folders.values() for name in names),
            tree=_tree(image_folders),
            source="your own export (e.g. from PACS)",
        )
        self.normal_split_ratio = normal_split_ratio
        self.read_options = read_options or ReadOptions()
        super().__init__(root=root, split=split, seed=seed, check_images=check_images, augmentations=augmentations)
        check_options_apply([Path(path) for path in self.samples.image_path], self.read_options)

    def _required_folders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.layout.folders))  # a folder given twice is listed once

    def _masks_by_stem(self) -> dict[str, Path]:
        if not self.folders["mask"]:
            return {}
        (name,) = self.folders["mask"]
        folder = find_folder(self.root, name) if name != "." else self.root
        if folder is None:
            msg = f"MedicalFolder: mask_dir '{self.root / name}' does not exist"
            raise DatasetLayoutError(msg)
        masks: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if is_image_file(path):
                stem = path.stem.casefold()
                masks[stem.removesuffix("_mask")] = path
        return masks

    def _assign(self, images: Mapping[str, Sequence[ImageEntry]]) -> list[Assignment]:
        def gather(role: str) -> list[ImageEntry]:
            return [entry for name in dict.fromkeys(self.folders[role]) for entry in images[name]]

        normal = gather("normal")
        if self.folders["normal_test"]:
            train, test = normal, gather("normal_test")
        else:
            ratio = Fraction(self.normal_split_ratio).limit_denominator(10_000)
            train, test = self._partition(normal, [1 - ratio, ratio])
        masks = self._masks_by_stem()
        abnormal = [
            replace(entry, masks=(masks[entry.path.stem.casefold()],)) if entry.path.stem.casefold() in masks else entry
            for entry in gather("abnormal")
        ]
        return [
            *self._assign_all(train, normal=True, split=Split.TRAIN),
            *self._assign_all(test, normal=True, split=Split.TEST),
            *self._assign_all(abnormal, normal=False, split=Split.TEST),
        ]


class MedicalPredictDataset(AnomalibDataset):
    """Unlabelled images to score, read with :func:`~anomalib_adfa.data.image.load_image`.

    Args:
        paths: Files and folders (searched recursively).
        read_options: DICOM window and frame choices.
        check_images: Read every file first and report all bad ones at once.
        augmentations: Transform applied to each image (the datamodule adds the model's resize).

    Raises:
        DatasetLayoutError: When a path is missing or a folder has no images.
        CorruptImageError: When ``check_images`` is set and some files cannot be read.
    """

    def __init__(
        self,
        paths: Folders,
        read_options: ReadOptions | None = None,
        check_images: bool = True,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.read_options = read_options or ReadOptions()
        self.image_paths = find_image_files(_as_list(paths))
        check_options_apply(self.image_paths, self.read_options)
        if check_images:
            check_readable(self.image_paths, self.read_options)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> ImageItem:
        path = self.image_paths[index]
        image = load_image(path, self.read_options)
        if self.augmentations:
            image = self.augmentations(image)
        return ImageItem(image=image, image_path=str(path))


class MedicalFolder(MedicalDataModule):
    """Datamodule for your own folders of images; see :mod:`anomalib_adfa.data.folder`.

    Args:
        root: Folder holding the image folders; may be left out when they are absolute.
        normal_dir: Folder(s) of normal images.
        abnormal_dir: Folder(s) of abnormal test images.
        normal_test_dir: Folder(s) of normal test images (default: a seeded ``normal_split_ratio`` of
            ``normal_dir``).
        mask_dir: Folder of masks of the abnormal images (``<stem>.<ext>`` or ``<stem>_mask.<ext>``).
        normal_split_ratio: Fraction of ``normal_dir`` that tests when there is no ``normal_test_dir``.
        predict_dir: Files or folders to predict on (``predict_dataloader``); needs no other folder.
        window: DICOM VOI transform: index of the file's VOI LUT / window (default the first), or ``"full"``
            for the full modality range.
        window_center: DICOM window centre to use instead of the file's (with ``window_width``).
        window_width: DICOM window width to use instead of the file's.
        frame: Frame of multi-frame DICOM files (refused without one).
        **kwargs: The other arguments of :class:`~anomalib_adfa.data.base.MedicalDataModule`
            (``seed``, ``check_images``, batch sizes, augmentations, ``val_split_mode``, ...).

    Example:
        >>> datamodule = MedicalFolder(root="scans", normal_dir="normal", abnormal_dir="abnormal")
        >>> datamodule.setup()
    """

    dataset_class = MedicalFolderDataset

    def __init__(
        self,
        root: str | Path | None = None,
        normal_dir: Folders | None = None,
        abnormal_dir: Folders | None = None,
        normal_test_dir: Folders | None = None,
        mask_dir: str | Path | None = None,
        normal_split_ratio: float = 0.2,
        predict_dir: Folders | None = None,
        window: int | Literal["full"] = 0,
        window_center: float | None = None,
        window_width: float | None = None,
        frame: int | None = None,
        **kwargs: Any,
    ) -> None:
        if normal_dir is None and predict_dir is None:
            msg = "MedicalFolder: give normal_dir and abnormal_dir to train and test, or predict_dir to predict"
            raise ValueError(msg)
        if (normal_dir is None) != (abnormal_dir is None):
            msg = "MedicalFolder: normal_dir and abnormal_dir are needed together (test metrics need both)"
            raise ValueError(msg)
        self.read_options = ReadOptions(
            window=window, window_center=window_center, window_width=window_width, frame=frame
        )
        self.folders = {
            "normal": normal_dir,
            "abnormal": abnormal_dir,
            "normal_test": normal_test_dir,
            "mask": mask_dir,
        }
        if normal_dir is not None:
            root, _ = resolve_folders(root, self.folders)
        super().__init__(root=root if root is not None else Path.cwd(), **kwargs)
        self.normal_split_ratio = normal_split_ratio
        self.predict_dir = predict_dir

    def _dataset_options(self) -> dict[str, Any]:
        return {
            "normal_dir": self.folders["normal"],
            "abnormal_dir": self.folders["abnormal"],
            "normal_test_dir": self.folders["normal_test"],
            "mask_dir": self.folders["mask"],
            "normal_split_ratio": self.normal_split_ratio,
            "read_options": self.read_options,
        }

    def setup(self, stage: str | None = None) -> None:
        """Set up the train/validation/test splits, or only the images to predict on at the predict stage."""
        if self.predict_dir is not None and (stage == "predict" or self.folders["normal"] is None):
            self._setup_predict()
            return
        super().setup(stage)

    def _setup_predict(self) -> None:
        if getattr(self, "predict_data", None) is None:
            self.predict_data = MedicalPredictDataset(self.predict_dir, self.read_options, self.check_images)
        model_transform = get_nested_attr(self, "trainer.model.pre_processor.transform", None)
        if model_transform:  # resize before collating, as anomalib does for the test split
            self._update_subset_augmentations(self.predict_data, self.test_augmentations, model_transform)
        else:
            self.predict_data.augmentations = self.test_augmentations

    def predict_dataloader(self) -> DataLoader:
        """Load the ``predict_dir`` images when given, else the test split (anomalib's default)."""
        if self.predict_dir is None:
            return super().predict_dataloader()
        self._setup_predict()
        return DataLoader(
            self.predict_data,
            shuffle=False,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.predict_data.collate_fn,
        )
