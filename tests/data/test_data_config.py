"""The datamodules load from the YAML configs and from anomalib's command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from anomalib.cli import AnomalibCLI
from anomalib.data import AnomalibDataModule
from anomalib.data.utils import ValSplitMode

from anomalib_adfa import RankPreservingPostProcessor
from anomalib_adfa.data import BUSI, BrainMRI, Covid, SIPaKMeD

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = PROJECT_ROOT / "configs" / "data"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("brainmri", BrainMRI), ("covid", Covid), ("busi", BUSI), ("sipakmed", SIPaKMeD)],
)
def test_config_builds_its_datamodule(name: str, expected: type, tmp_path: Path) -> None:
    config = CONFIGS / f"{name}.yaml"
    assert yaml.safe_load(config.read_text())["class_path"] == f"anomalib_adfa.data.{expected.__name__}"
    datamodule = AnomalibDataModule.from_config(config, **{"data.root": str(tmp_path), "data.seed": 213})
    assert type(datamodule) is expected
    assert datamodule.root == tmp_path
    assert datamodule.seed == 213
    assert datamodule.num_workers == 0
    assert datamodule.val_split_mode == ValSplitMode.FROM_TRAIN


def test_anomalib_cli_resolves_the_class_paths(tmp_path: Path) -> None:
    """``anomalib train --data anomalib_adfa.data.SIPaKMeD --data.root ...`` builds the datamodule (not run)."""
    args = [
        "train",
        "--model",
        "Padim",
        "--model.pre_trained",
        "false",
        "--model.post_processor",
        "anomalib_adfa.RankPreservingPostProcessor",
        "--data",
        "anomalib_adfa.data.SIPaKMeD",
        "--data.root",
        str(tmp_path),
        "--data.include_metaplastic",
        "true",
        "--default_root_dir",
        str(tmp_path / "results"),
    ]
    cli = AnomalibCLI(args=args, run=False)
    assert type(cli.datamodule) is SIPaKMeD
    assert cli.datamodule.root == tmp_path
    assert cli.datamodule.include_metaplastic is True
    assert cli.datamodule.num_workers == 0
    assert isinstance(cli.model.post_processor, RankPreservingPostProcessor)
