"""Errors raised when a dataset folder cannot be used as it is."""

from anomalib_adfa.errors import AdfaInputError


class DatasetLayoutError(AdfaInputError, ValueError):
    """The dataset root is missing or its folders do not match the expected layout.

    The message names the root that was given, draws the expected layout, lists what was
    found instead and says where the dataset can be downloaded.
    """


class CorruptImageError(AdfaInputError, ValueError):
    """One or more image or mask files cannot be used as they are.

    Corrupt, truncated or not an image; a DICOM file the reader cannot turn into an image (no pixel
    data, no decoder installed, several frames without a choice...); or a mask whose size differs
    from its image's. The message lists every bad file with its path and the problem, so that all of them can be
    fixed or re-downloaded at once.
    """
