"""Errors raised when a dataset folder cannot be used as it is."""


class DatasetLayoutError(ValueError):
    """The dataset root is missing or its folders do not match the expected layout.

    The message names the root that was given, draws the expected layout, lists what was
    found instead and says where the dataset can be downloaded.
    """


class CorruptImageError(ValueError):
    """One or more image or mask files cannot be decoded (corrupt, truncated or not an image).

    The message lists every bad file with its path and the decoder's complaint, so that all of
    them can be fixed or re-downloaded at once.
    """
