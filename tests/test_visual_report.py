"""``anomalib-adfa report``: every figure is produced and referenced, the page is offline, bad folders are refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomalib_adfa.callbacks import REPORT_DATA_DIR
from anomalib_adfa.cli import main
from anomalib_adfa.evaluation.conformal import clopper_pearson
from anomalib_adfa.report.visual_report import write_report


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


def test_summary_leads_with_the_operating_point(localisation_runs: dict[str, Path], tmp_path: Path) -> None:
    run = localisation_runs["phantom"]
    info = json.loads((run / REPORT_DATA_DIR / "run.json").read_text())
    assert info["image_threshold_normalized"] == 0.5
    assert info["target_specificity"] == 0.95
    assert info["threshold_normals"] == 3  # same_as_test: the 3 normal test images
    predictions = pd.read_csv(run / REPORT_DATA_DIR / "predictions.csv")
    normal = predictions.pred_score[predictions.gt_label == 0]
    cleared = int((normal <= info["image_threshold"]).sum())
    low, high = clopper_pearson(cleared, len(normal))
    page = write_report(run / REPORT_DATA_DIR, tmp_path / "report")
    text = page.read_text()
    table = text[text.index("<table>") : text.index("</table>")]
    headings = re.findall(r"<th>([^<]+)</th>", table)
    assert headings[2:7] == [
        "Sensitivity [95% CI]",
        "Specificity [95% CI]",
        "Target spec.",
        "n normals",
        "Threshold [raw]",
    ]
    assert headings.index("image AUROC") > 6
    expected = f"{cleared / len(normal):.3f} [{low:.3f}, {high:.3f}] ({cleared}/{len(normal)})"
    assert f"<td>{expected}</td>" in table
    assert f"<td>0.5 [{info['image_threshold']:.4g}]</td>" in table  # normalised, raw in brackets
    assert "<details" not in table  # the operating point is not hidden in a collapsed section
