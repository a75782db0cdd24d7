"""``anomalib benchmark`` runs ADFA on BrainMRI from ``configs/benchmark_brainmri.yaml``, grid search included."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG = PROJECT_ROOT / "configs" / "benchmark_brainmri.yaml"
ANOMALIB = Path(sys.executable).with_name("anomalib")


def test_config_names_adfa_and_brainmri_with_a_grid() -> None:
    config = yaml.safe_load(CONFIG.read_text())["benchmark"]
    assert config["model"]["class_path"] == "Adfa"
    assert config["data"]["class_path"] == "BrainMRI"
    assert config["model"]["init_args"]["topk_mode"] == {"grid": ["hard", "reference"]}
    assert config["model"]["init_args"]["backbone_weights"] == "packaged"  # runs offline


@pytest.mark.slow
def test_anomalib_benchmark_runs_adfa_on_brainmri(brainmri_root: Path, tmp_path: Path) -> None:
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "brain_tumor_dataset").symlink_to(brainmri_root)  # the config's relative root
    env = {**os.environ, "PL_TRAINER_MAX_EPOCHS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(ANOMALIB), "benchmark", "--config", str(CONFIG)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "There were some errors" not in result.stdout, (tmp_path / "runs" / "pipeline.log").read_text()[-3000:]
    (results,) = (tmp_path / "runs" / "benchmark").glob("*/results.csv")
    rows = list(csv.DictReader(results.open()))
    assert sorted(row["model.init_args.topk_mode"] for row in rows) == ["hard", "reference"]
    assert all(0.0 <= float(row["image_AUROC"]) <= 1.0 for row in rows)
