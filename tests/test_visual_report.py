"""``anomalib-adfa report``: every figure is produced and referenced, the page is offline, bad folders are refused."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomalib_adfa.callbacks import REPORT_DATA_DIR
from anomalib_adfa.cli import main


def test_recorder_saves_what_the_report_needs(localisation_runs: dict[str, Path]) -> None:
    for run in localisation_runs.values():
        data = run / REPORT_DATA_DIR
        predictions = pd.read_csv(data / "predictions.csv")
        with np.load(data / "thumbnails.npz") as archive:
            keys = set(archive.files)
            shapes = {key: archive[key].shape for key in archive.files}
        for index in predictions["index"]:
            assert {f"image_{index}", f"map_{index}", f"mask_{index}", f"box_{index}"} <= keys
            assert shapes[f"image_{index}"][:2] == shapes[f"map_{index}"] == shapes[f"mask_{index}"]
            assert max(shapes[f"map_{index}"]) <= 128


def test_report_produces_and_references_every_figure(
    localisation_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "results"
    for name, run in localisation_runs.items():  # one folder above several runs, as anomalib's results/ is
        shutil.copytree(run / REPORT_DATA_DIR, folder / name / "v0" / REPORT_DATA_DIR)
    assert main(["report", str(folder)]) == 0
    page = folder / "report" / "index.html"
    assert f"report: {page}" in capsys.readouterr().out
    text = page.read_text()
    referenced = set(re.findall(r"<img src='([^']+)'", text))
    produced = {path.name for path in page.parent.glob("*.png")}
    assert referenced == produced
    datasets = {"phantom", *(["BUSI"] if "busi_sample" in localisation_runs else [])}
    per_run = ("histogram", "false_alarms", "misses", "typical_cases")
    expected = {f"roc_{dataset}.png" for dataset in datasets}
    expected |= {f"{dataset}__Adfa_{kind}.png" for dataset in datasets for kind in per_run}
    assert produced == expected
    for name in produced:
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", text), "the page must not load anything from the network"
    assert "test_spec95" in text  # the phantom run's image threshold, chosen on its validation (= test) normals
    assert "colour scale, fixed for this run" in text


def test_report_refuses_a_folder_without_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert "EvaluationRecorder" in capsys.readouterr().err
