"""Datamodules for the ADFA paper's medical datasets, read from their public downloads.

``BrainMRI``, ``Covid``, ``BUSI`` and ``SIPaKMeD`` are anomalib datamodules that take the unzipped
download (or the folder containing it) as ``root`` and reproduce the paper's Table 2 splits::

    anomalib train --model Padim --data anomalib_adfa.data.BrainMRI --data.root ~/data/brain_tumor_dataset

With anomalib's own models, add ``--model.post_processor anomalib_adfa.RankPreservingPostProcessor``
so that the printed ``image_AUROC`` is the AUROC of the raw scores (see
:mod:`anomalib_adfa.post_processing`; ADFA uses it by default).
"""

from anomalib_adfa.data.base import DEFAULT_SEED, MedicalDataModule, MedicalDataset
from anomalib_adfa.data.brainmri import BrainMRI, BrainMRIDataset
from anomalib_adfa.data.busi import BUSI, BUSIDataset
from anomalib_adfa.data.covid import Covid, CovidDataset
from anomalib_adfa.data.errors import CorruptImageError, DatasetLayoutError
from anomalib_adfa.data.image import load_image, load_mask
from anomalib_adfa.data.sipakmed import SIPaKMeD, SIPaKMeDDataset

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
    "SIPaKMeD",
    "SIPaKMeDDataset",
    "load_image",
    "load_mask",
]
