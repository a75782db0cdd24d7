"""Shared pytest fixtures: paths to the real medical images and a fixed seed."""

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_dataset(relative: str) -> Path:
    """Return ``../shared/data/<relative>`` or skip the calling test when it is absent."""
    path = SHARED_DATA / relative
    if not path.is_dir():
        pytest.skip(f"real images not available: {path} is missing (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def brainmri_root() -> Path:
    """Root of the real BrainMRI download (``no/``, ``yes/``)."""
    return shared_dataset("brain_tumor_dataset")


@pytest.fixture(scope="session")
def covid_root() -> Path:
    """Root of the real Covid download (``train/``, ``test/``)."""
    return shared_dataset("covid19_xray/xray_dataset_covid19")


@pytest.fixture(scope="session")
def busi_sample_root() -> Path:
    """Root of the small real BUSI sample (``normal/``, ``benign/``, ``malignant/``)."""
    return shared_dataset("busi_sample/Dataset_BUSI_with_GT")
