"""Find a dataset's class folders under the folder a user points at, and list the images in them.

Public downloads unpack in slightly different shapes: a zip may add a top folder, Kaggle's BrainMRI
archive carries a second copy of ``no/`` and ``yes/`` beside ``brain_tumor_dataset/``, and some
SIPaKMeD downloads nest every class folder twice (``im_Parabasal/im_Parabasal/``). The helpers here
accept all of these, match folder names and extensions in any case, and skip the files that
operating systems and spreadsheets leave behind.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anomalib_adfa.data.dicom import is_dicom
from anomalib_adfa.data.errors import DatasetLayoutError

if TYPE_CHECKING:
    from collections.abc import Iterable

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
_IGNORED_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})
_MASK_STEM = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?$", re.IGNORECASE)
_MAX_LISTED = 20


@dataclass(frozen=True)
class DatasetLayout:
    """How a dataset's public download is laid out.

    Args:
        name: Dataset name used in messages.
        folders: Every class folder the dataset knows, relative to the dataset root, ``/``-separated.
        tree: Drawing of the expected layout, shown when the root does not match it.
        source: Where the dataset can be downloaded.
    """

    name: str
    folders: tuple[str, ...]
    tree: str
    source: str


@dataclass(frozen=True)
class ImageEntry:
    """One image file and the mask files that belong to it.

    Args:
        path: The image file.
        folder: Name of its class folder in the layout (e.g. ``"test/NORMAL"``), whatever its case or
            nesting on disk.
        masks: The image's ``_mask`` and ``_mask_N`` files, in index order.
    """

    path: Path
    folder: str
    masks: tuple[Path, ...] = ()

    @property
    def key(self) -> str:
        """``<class folder>/<file name>``: what splits are computed from.

        Keys do not depend on where the dataset lives or how its folders are nested, and splits compare
        them case-insensitively (see :func:`~anomalib_adfa.data.split.seeded_order`).
        """
        return f"{self.folder}/{self.path.name}"


def is_ignored(name: str) -> bool:
    """Return whether a directory entry is operating-system or archive clutter (``.DS_Store``, ``__MACOSX``...)."""
    return name.startswith(".") or name.casefold() in _IGNORED_NAMES


def _subdirectories(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_ignored(p.name))


def is_image_file(path: Path) -> bool:
    """Return whether a file is an image to use: an image extension, or DICOM content under any name."""
    if is_ignored(path.name) or not path.is_file():
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS or is_dicom(path)


def _has_images(folder: Path) -> bool:
    return any(is_image_file(p) for p in folder.iterdir())


def find_folder(base: Path, relative: str) -> Path | None:
    """Find ``relative`` below ``base``, matching each part of the path in any case.

    A folder nested in a folder of the same name with no images of its own (``im_X/im_X/``) is
    followed down to the copy that holds the images.

    Args:
        base: Folder to search from.
        relative: ``/``-separated relative path, e.g. ``"train/NORMAL"``.

    Returns:
        The folder, or ``None`` when it does not exist.
    """
    folder = base
    for part in relative.split("/"):
        matches = [p for p in _subdirectories(folder) if p.name.casefold() == part.casefold()]
        if not matches:
            return None
        exact = [p for p in matches if p.name == part]
        folder = (exact or matches)[0]
    while not _has_images(folder):
        nested = [p for p in _subdirectories(folder) if p.name.casefold() == folder.name.casefold()]
        if not nested:
            break
        folder = nested[0]
    return folder


def layout_error(root: Path, layout: DatasetLayout, found: str, problem: str | None = None) -> DatasetLayoutError:
    """Build the error for a root that cannot be used.

    Args:
        root: The root the user gave.
        layout: The dataset's expected layout.
        found: What was found instead.
        problem: One-line summary; defaults to "no usable dataset".

    Returns:
        The error, ready to raise.
    """
    summary = problem or f"no usable dataset at '{root}'"
    message = (
        f"{layout.name}: {summary}.\n"
        f"Expected layout (at the root, or in a folder directly below it):\n{layout.tree}\n"
        f"Found:\n{found}\n"
        f"Get the dataset from {layout.source}, unzip it and pass the unzipped folder (or the folder that "
        "contains it) as root; nothing is downloaded automatically."
    )
    return DatasetLayoutError(message)


def _listing(folder: Path) -> str:
    entries = sorted(p for p in folder.iterdir() if not is_ignored(p.name))
    if not entries:
        return f"  '{folder}' is empty"
    names = [f"{p.name}/" if p.is_dir() else p.name for p in entries[:_MAX_LISTED]]
    more = f" ... and {len(entries) - _MAX_LISTED} more" if len(entries) > _MAX_LISTED else ""
    return f"  '{folder}' contains: {', '.join(names)}{more}"


def _describe(root: Path, folders: tuple[str, ...]) -> str:
    if not root.exists():
        return f"  '{root}' does not exist"
    if not root.is_dir():
        return f"  '{root}' is a file, not a folder"
    lines = [_listing(root)]
    for candidate in [root, *_subdirectories(root)]:
        present = [f for f in folders if find_folder(candidate, f) is not None]
        if present:
            missing = [f"{f}/" for f in folders if f not in present]
            lines.append(f"  '{candidate}' has {', '.join(f + '/' for f in present)} but lacks {', '.join(missing)}")
    return "\n".join(lines)


def locate_folders(root: str | Path, layout: DatasetLayout, required: tuple[str, ...]) -> tuple[Path, dict[str, Path]]:
    """Resolve the dataset root and its class folders.

    The root itself is tried first, then each folder directly below it in name order, so a root that
    holds both the class folders and a duplicate copy of them (Kaggle's BrainMRI zip) uses its own.

    Args:
        root: The folder the user pointed at.
        layout: The dataset's expected layout.
        required: Class folders that must all be present.

    Returns:
        The dataset root and, for each required class folder, where it is on disk.

    Raises:
        DatasetLayoutError: When neither the root nor a folder directly below it holds every required folder.
    """
    root = Path(os.path.abspath(Path(root).expanduser()))  # normalise '..' without resolving symbolic links
    if root.is_dir():
        for candidate in [root, *_subdirectories(root)]:
            found = {name: find_folder(candidate, name) for name in required}
            if all(path is not None for path in found.values()):
                return candidate, {name: path for name, path in found.items() if path is not None}
    raise layout_error(root, layout, _describe(root, required))


def list_images(folder: Path, folder_name: str) -> list[ImageEntry]:
    """List the images directly inside a class folder, each with its mask files.

    Files named ``<image stem>_mask.<ext>`` or ``<image stem>_mask_<N>.<ext>`` are masks, never samples.
    DICOM files count whatever their name (PACS exports often have none). Subfolders (e.g. SIPaKMeD's
    ``CROPPED/``), hidden files, ``Thumbs.db`` and non-image files (``.csv``, ``.dat``...) are skipped.

    Args:
        folder: Class folder on disk.
        folder_name: The class folder's name in the layout.

    Returns:
        The images, sorted by key.
    """
    images: list[Path] = []
    masks: dict[str, list[tuple[int, str, Path]]] = defaultdict(list)
    for path in folder.iterdir():
        if not is_image_file(path):
            continue
        match = _MASK_STEM.match(path.stem)
        if match:
            masks[match["stem"].casefold()].append((int(match["index"] or 0), path.name, path))
        else:
            images.append(path)

    entries = []
    for path in images:
        own_masks = sorted(masks.pop(path.stem.casefold(), []))
        entries.append(ImageEntry(path=path, folder=folder_name, masks=tuple(mask for *_, mask in own_masks)))
    if masks:
        orphans = sorted(path.name for group in masks.values() for *_, path in group)
        logger.warning("%s: ignoring %d mask file(s) with no image: %s", folder, len(orphans), ", ".join(orphans))
    return sorted(entries, key=lambda entry: (entry.key.casefold(), entry.key))


def find_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Image files to score: each file given, then every image file below each folder given (sorted).

    Args:
        paths: Files and folders; folders are searched recursively, skipping hidden and clutter entries.

    Returns:
        The files, in the order given.

    Raises:
        DatasetLayoutError: When a path does not exist, or a folder holds no image file.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                file
                for file in path.rglob("*")
                if is_image_file(file) and not any(is_ignored(part) for part in file.relative_to(path).parts)
            )
            if not found:
                msg = f"no image files (DICOM, PNG, JPEG, BMP, TIFF) in '{path}'"
                raise DatasetLayoutError(msg)
            files.extend(found)
        else:
            msg = f"'{path}' does not exist"
            raise DatasetLayoutError(msg)
    return files
