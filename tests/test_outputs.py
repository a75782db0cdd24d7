"""Prediction outputs go to a new folder of the checkpoint's run."""

from pathlib import Path
from types import SimpleNamespace

from anomalib_adfa.outputs import prediction_folder, run_folder


def _trainer(root: Path, ckpt_path: Path | None) -> SimpleNamespace:
    return SimpleNamespace(default_root_dir=str(root), ckpt_path=None if ckpt_path is None else str(ckpt_path))


def test_run_folder_is_the_checkpoints_run(tmp_path: Path) -> None:
    run = tmp_path / "results" / "Adfa" / "BrainMRI" / "v3"
    assert run_folder(_trainer(tmp_path / "x", run / "weights" / "lightning" / "model.ckpt")) == run
    assert run_folder(_trainer(tmp_path / "x", tmp_path / "elsewhere" / "model.ckpt")) == tmp_path / "elsewhere"
    assert run_folder(_trainer(tmp_path / "x", None)) == tmp_path / "x"


def test_each_prediction_run_gets_a_new_folder_shared_by_its_callbacks(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run" / "weights" / "lightning" / "model.ckpt"
    first = _trainer(tmp_path / "latest", checkpoint)
    folder = prediction_folder(first)
    assert folder == tmp_path / "run" / "predictions" / "0"
    assert folder.is_dir()
    assert prediction_folder(first) == folder  # the visualiser and the CSV writer agree
    assert prediction_folder(_trainer(tmp_path / "latest", checkpoint)) == tmp_path / "run" / "predictions" / "1"
