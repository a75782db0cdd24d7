"""Datamodules for the ADFA paper's medical datasets, read from their public downloads, and for your own data.

``BrainMRI``, ``Covid``, ``BUSI`` and ``SIPaKMeD`` are anomalib datamodules that take the unzipped
download (or the folder containing it) as ``root`` and reproduce the paper's Table 2 splits::

    anomalib train --model Padim --data anomalib_adfa.data.BrainMRI --data.root ~/data/brain_tumor_dataset

With anomalib's own models, add ``--model.post_processor anomalib_adfa.RankPreservingPostProcessor``
so that the printed ``image_AUROC`` is the AUROC of the raw scores (see
:mod:`anomalib_adfa.evaluation.post_processing`; ADFA uses it by default).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalib_adfa.data.base import DEFAULT_SEED, MedicalDataModule, MedicalDataset
    from anomalib_adfa.data.brainmri import BrainMRI, BrainMRIDataset
    from anomalib_adfa.data.busi import BUSI, BUSIDataset
    from anomalib_adfa.data.covid import Covid, CovidDataset
    from anomalib_adfa.data.dicom import ReadOptions
    from anomalib_adfa.data.errors import CorruptImageError, DatasetLayoutError
    from anomalib_adfa.data.folder import MedicalFolder, MedicalFolderDataset, MedicalPredictDataset
    from anomalib_adfa.data.image import load_image, load_mask
    from anomalib_adfa.data.sipakmed import SIPaKMeD, SIPaKMeDDataset

# Where each public name lives; loaded on first access so that the image reader does not import anomalib.
_HOMES = {
    "DEFAULT_SEED": "base",
    "MedicalDataModule": "base",
    "MedicalDataset": "base",
    "BrainMRI": "brainmri",
    "BrainMRIDataset": "brainmri",
    "BUSI": "busi",
    "BUSIDataset": "busi",
    "Covid": "covid",
    "CovidDataset": "covid",
    "ReadOptions": "dicom",
    "CorruptImageError": "errors",
    "DatasetLayoutError": "errors",
    "MedicalFolder": "folder",
    "MedicalFolderDataset": "folder",
    "MedicalPredictDataset": "folder",
    "load_image": "image",
    "load_mask": "image",
    "SIPaKMeD": "sipakmed",
    "SIPaKMeDDataset": "sipakmed",
}

__all__ = [
    "BUSI",
    "DEFAULT_SEED",
    "BUSIDataset",
    "BrainMRI",
    "BrainMRIDataset",
    "CorruptImageError",
    "Covid",
    "CovidDataset",
    "DatasetLayoutError",
    "MedicalDataModule",
    "MedicalDataset",
    "MedicalFolder",
    "MedicalFolderDataset",
    "MedicalPredictDataset",
    "ReadOptions",
    "SIPaKMeD",
    "SIPaKMeDDataset",
    "load_image",
    "load_mask",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access (PEP 562)."""
    if name not in _HOMES:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
