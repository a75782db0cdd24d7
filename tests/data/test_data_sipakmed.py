"""SIPaKMeD on a generated tree with the public layout (nested folders, CROPPED/, .dat files) and full counts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from anomalib_adfa.data import DatasetLayoutError, SIPaKMeD

PAPER_PROTOCOL = "same_as_test"  # the paper's split: every training normal trains (default from_train holds half out)


def setup(datamodule: SIPaKMeD) -> SIPaKMeD:
    datamodule.setup()
    return datamodule


def split_counts(datamodule: SIPaKMeD) -> tuple[int, dict[int, int]]:
    return len(datamodule.train_data), datamodule.test_data.samples.label_index.value_counts().to_dict()


def test_full_layout_gives_the_paper_split(sipakmed_full_root: Path) -> None:
    datamodule = setup(SIPaKMeD(val_split_mode=PAPER_PROTOCOL, root=sipakmed_full_root))
    assert split_counts(datamodule) == (180, {1: 461, 0: 54})
    assert set(datamodule.train_data.samples.label) == {"im_Parabasal", "im_Superficial-Intermediate"}
    test = datamodule.test_data.samples
    assert set(test.label[test.label_index == 1]) == {"im_Dyskeratotic", "im_Koilocytotic"}


def test_only_cluster_images_are_used(sipakmed_full_root: Path) -> None:
    datamodule = setup(SIPaKMeD(val_split_mode=PAPER_PROTOCOL, root=sipakmed_full_root))
    paths = [*datamodule.train_data.samples.image_path, *datamodule.test_data.samples.image_path]
    assert not [path for path in paths if "CROPPED" in path or not path.lower().endswith(".bmp")]
    assert any(path.endswith(".BMP") for path in paths)
    nested = [path for path in paths if "im_Parabasal/im_Parabasal/" in Path(path).as_posix()]
    assert len(nested) == 108


def test_split_is_seeded_and_disjoint(sipakmed_full_root: Path) -> None:
    first, again, other = (
        setup(SIPaKMeD(val_split_mode=PAPER_PROTOCOL, root=sipakmed_full_root, seed=seed)) for seed in (1024, 1024, 213)
    )
    train = set(first.train_data.samples.image_path)
    assert not train & set(first.test_data.samples.image_path)
    assert train == set(again.train_data.samples.image_path)
    assert train != set(other.train_data.samples.image_path)
    assert split_counts(other) == (180, {1: 461, 0: 54})


def test_metaplastic_can_be_included(sipakmed_full_root: Path) -> None:
    datamodule = setup(SIPaKMeD(val_split_mode=PAPER_PROTOCOL, root=sipakmed_full_root, include_metaplastic=True))
    assert split_counts(datamodule) == (180, {1: 461 + 9, 0: 54})


def test_metaplastic_folder_is_optional_unless_included(tmp_path: Path, sipakmed_factory: Callable[..., Path]) -> None:
    counts = {"im_Parabasal": 4, "im_Superficial-Intermediate": 5, "im_Dyskeratotic": 3, "im_Koilocytotic": 2}
    root = sipakmed_factory(tmp_path / "sipakmed", counts=counts)
    # 9 normal: round(9 * 180/234) = 7 train, 2 test.
    assert split_counts(setup(SIPaKMeD(val_split_mode=PAPER_PROTOCOL, root=tmp_path))) == (7, {1: 5, 0: 2})
    with pytest.raises(DatasetLayoutError, match="lacks im_Metaplastic/"):
        SIPaKMeD(val_split_mode=PAPER_PROTOCOL, root=root, include_metaplastic=True).setup()
