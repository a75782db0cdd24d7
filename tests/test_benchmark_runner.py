"""Tests of the benchmark runner: metrics, model building with local weights, and an end-to-end smoke run."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anomalib_adfa.callbacks import CrossFitThreshold
from anomalib_adfa.evaluation.conformal import clopper_pearson
from anomalib_adfa.weights import LITE0_BACKBONE, efficientnet_lite0_weights, load_state_dict_file
from benchmarks import run
from benchmarks.jobs import CROSSFIT_FOLDS, PROTOCOLS, JobSpec, MedicalBenchmarkJob, _ScoreRecorder
from benchmarks.machine import commit
from benchmarks.metrics import auroc, best_f1, bootstrap_auroc_ci, operating_point
from benchmarks.models import ModelSettings, UnsupportedModelError, build_model
from benchmarks.report import plot


def test_auroc_counts_ties_as_half() -> None:
    labels = np.array([0, 0, 1, 1])
    assert auroc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auroc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    # One tied normal/anomalous pair out of four pairs: 3 wins + 0.5.
    assert auroc(labels, np.array([0.1, 0.3, 0.3, 0.4])) == pytest.approx(0.875)


def test_auroc_rejects_single_class() -> None:
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.array([1, 1]), np.array([0.2, 0.3]))


def test_best_f1_uses_only_realisable_thresholds() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.8, 0.8, 0.2])
    f1, threshold = best_f1(labels, scores)
    # Threshold 0.8 flags 3 images (2 anomalous): F1 = 4/6; threshold 0.2 flags 4 (3 anomalous): F1 = 6/7.
    assert f1 == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.2)


def test_bootstrap_interval_brackets_the_auroc() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40, dtype=int), np.ones(60, dtype=int)]
    scores = rng.normal(size=100) + labels
    value = auroc(labels, scores)
    interval = bootstrap_auroc_ci(labels, scores, num_samples=500)
    assert interval.low < value < interval.high
    assert interval.low >= 0.0
    assert interval.high <= 1.0


def test_operating_point_uses_the_validation_quantile_and_brackets_the_rates() -> None:
    rng = np.random.default_rng(0)
    val_normal = np.arange(1.0, 21.0)  # conformal rank ceil(21 * 0.9) = 19: the threshold is 19
    labels = np.r_[np.zeros(200, dtype=int), np.ones(100, dtype=int)]
    scores = np.r_[rng.uniform(0, 20, 200), rng.uniform(15, 40, 100)]
    point = operating_point(val_normal, labels, scores, 0.9, num_samples=500)
    assert point.threshold == 19.0
    assert point.specificity == pytest.approx((scores[:200] <= 19).mean())
    assert point.sensitivity == pytest.approx((scores[200:] > 19).mean())
    assert point.specificity_ci.low < point.specificity < point.specificity_ci.high
    assert point.sensitivity_ci.low < point.sensitivity < point.sensitivity_ci.high


def test_crossfit_protocol_sets_the_operating_point_on_the_out_of_fold_scores() -> None:
    args = run.parse_args(["--protocol", "crossfit", "from_train", "--datasets", "covid", "--models", "padim"])
    assert [spec.protocol for spec in run.job_specs(args)[:2]] == ["crossfit", "from_train"]
    assert PROTOCOLS["crossfit"] == "crossfit"
    assert CROSSFIT_FOLDS == 5
    job = MedicalBenchmarkJob(JobSpec("covid", "padim", 1024, protocol="crossfit"), context=None)
    crossfit = CrossFitThreshold()
    crossfit.scores = torch.arange(1.0, 21.0, dtype=torch.float64)  # 20 out-of-fold normal scores
    job.model = SimpleNamespace(post_processor=SimpleNamespace(image_threshold=torch.tensor(20.0)))
    labels = np.r_[np.zeros(10, dtype=int), np.ones(10, dtype=int)]
    scores = np.r_[np.linspace(0, 22, 10), np.linspace(15, 40, 10)]
    result = job._operating_point(_ScoreRecorder(), labels, scores, crossfit)
    # No validation epoch ran (the recorder is empty): the 20 out-of-fold scores set the threshold, rank 20.
    assert result["threshold_normals"] == 20
    assert result["threshold"] == 20.0
    assert not result["threshold_mismatch"]
    cleared = int((scores[:10] <= 20).sum())
    assert result["test_specificity"] == cleared / 10
    low, high = clopper_pearson(cleared, 10)
    assert (result["test_specificity_cp_low"], result["test_specificity_cp_high"]) == (low, high)
    flagged = int((scores[10:] > 20).sum())
    assert (result["test_sensitivity_cp_low"], result["test_sensitivity_cp_high"]) == clopper_pearson(flagged, 10)
    # Median of the out-of-fold scores 10.5: the test normals above it (12.2 ... 22) are 5 of 10.
    assert result["test_normals_above_calibration_median"] == int((scores[:10] > 10.5).sum()) / 10 == 0.5


def _lite0_settings() -> ModelSettings:
    return ModelSettings(LITE0_BACKBONE, efficientnet_lite0_weights(), lambda: True)


def test_anomalib_models_load_the_local_backbone_weights() -> None:
    settings = _lite0_settings()
    reference = load_state_dict_file(settings.weights)["conv_stem.weight"]
    padim = build_model("padim", settings)
    assert torch.equal(padim.model.feature_extractor.feature_extractor.state_dict()["conv_stem.weight"], reference)
    stfpm = build_model("stfpm", settings)
    assert torch.equal(stfpm.model.teacher_model.feature_extractor.state_dict()["conv_stem.weight"], reference)
    # The student stays randomly initialised, as in anomalib.
    assert not torch.equal(stfpm.model.student_model.feature_extractor.state_dict()["conv_stem.weight"], reference)


@pytest.mark.parametrize(("name", "reason"), [("cfa", "torchvision"), ("reverse_distillation", "Decoder")])
def test_models_that_cannot_use_the_backbone_say_why(name: str, reason: str) -> None:
    with pytest.raises(UnsupportedModelError, match=reason):
        build_model(name, _lite0_settings())


def test_a_run_folder_refuses_other_settings(tmp_path: Path) -> None:
    args = run.parse_args(["--backbone", "resnet18", "--output-dir", str(tmp_path)])
    run._check_run_settings(tmp_path, args)
    args.image_size = 128
    with pytest.raises(SystemExit, match="image_size"):
        run._check_run_settings(tmp_path, args)


def test_smoke_run_writes_results_and_resumes(
    covid_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        *("--datasets", "covid", "--models", "adfa", "padim", "--seeds", "1024", "213"),
        *("--backbone", LITE0_BACKBONE, "--max-epochs", "1", "--image-size", "48", "--center-crop", "0"),
        *("--dataset-root", f"covid={covid_root}", "--output-dir", str(tmp_path), "--run", "smoke"),
    ]
    assert run.main(argv) == 0
    run_dir = tmp_path / "smoke"
    results = pd.read_csv(run_dir / "results.csv")
    assert sorted(results.model) == ["adfa", "adfa", "padim", "padim"]
    assert (results.status == "ok").all()
    # Bounded memory: every job ran in its own process, which gave its memory back when it exited, so a later job's
    # peak does not include what earlier jobs left behind (in one process, 11 BUSI jobs reached 24 GB).
    assert results.pid.nunique() == len(results)
    assert os.getpid() not in set(results.pid)
    padim = results[results.model == "padim"].set_index("seed").peak_rss_mb
    assert padim[213] < 1.25 * padim[1024]
    assert results.image_AUROC.between(0, 1).all()
    assert results.anomalib_image_AUROC.between(0, 1).all()
    assert (results.image_AUROC_ci_low <= results.image_AUROC).all()
    assert (results.image_AUROC <= results.image_AUROC_ci_high).all()
    assert (results.epochs == 1).all()
    assert (results.peak_rss_mb > 0).all()
    assert (results.protocol == "paper").all()
    assert results.test_specificity.between(0, 1).all()
    assert (results.test_specificity_ci_low <= results.test_specificity).all()
    assert (results.calibration_gap == results.test_specificity - 0.95).all()
    assert not results.threshold_mismatch.any()  # the post-processor's threshold is the recomputed one
    assert np.allclose(results.anomalib_image_Specificity, results.test_specificity, atol=1e-6)
    summary = pd.read_csv(run_dir / "summary.csv").set_index("label")
    padim_auroc = results[results.model == "padim"].image_AUROC
    assert summary.loc["padim", "image_AUROC_std"] == pytest.approx(padim_auroc.std(ddof=1))
    table = (run_dir / "results.md").read_text()
    assert "| Model | Covid |" in table
    assert "sample standard deviation over seeds (n - 1)" in table
    assert "F1 oracle (test-calibrated)" in table
    assert "Table 1 (image AUROC)" in table
    assert "**" in table
    assert "capped by --max-epochs 1" in table
    assert (run_dir / "auroc.png").read_bytes()[:4] == b"\x89PNG"
    saved = {path.name: json.loads(path.read_text()) for path in (run_dir / "jobs").glob("*.json")}
    assert len(saved) == 4

    def recompute(*args: object, **kwargs: object) -> None:
        msg = f"a job was recomputed: {args}"
        raise AssertionError(msg)

    monkeypatch.setattr(run.subprocess, "call", recompute)
    capsys.readouterr()
    assert run.main(argv) == 0
    assert "4 of 4 job(s) already done; running 0" in capsys.readouterr().out
    assert pd.read_csv(run_dir / "results.csv").image_AUROC.tolist() == results.image_AUROC.tolist()


def test_a_failing_job_is_printed_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        *("--datasets", "covid", "--models", "padim", "--seeds", "1024", "--backbone", LITE0_BACKBONE),
        *("--dataset-root", f"covid={tmp_path / 'missing'}", "--output-dir", str(tmp_path), "--run", "broken"),
    ]
    assert run.main(argv) == 1
    out = capsys.readouterr().out
    assert "covid__padim__paper__seed1024: ERROR: " in out
    assert "Traceback" in out
    row = pd.read_csv(tmp_path / "broken" / "results.csv").iloc[0]
    assert row.status == "error"
    assert "missing" in row.error
    assert "NOT RUN: padim on covid: error" in out


def test_a_job_process_that_dies_is_recorded_as_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(run.subprocess, "call", lambda *args, **kwargs: -9)  # as if the OOM killer ended it
    argv = [
        *("--datasets", "covid", "--models", "padim", "--seeds", "1024", "--backbone", LITE0_BACKBONE),
        *("--output-dir", str(tmp_path), "--run", "killed"),
    ]
    assert run.main(argv) == 1
    assert "ERROR: job process exited with code -9 (signal 9" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "killed" / "results.csv").iloc[0].status == "error"


def test_busi_run_writes_pixel_metrics_for_every_model_and_a_visual_report(
    busi_sample_root: Path, tmp_path: Path
) -> None:
    argv = [
        *("--datasets", "busi", "--models", "adfa", "padim", "--seeds", "1024", "--protocol", "from_train"),
        *("--backbone", LITE0_BACKBONE, "--max-epochs", "1", "--image-size", "48", "--center-crop", "40"),
        *("--dataset-root", f"busi={busi_sample_root}", "--output-dir", str(tmp_path), "--run", "busi"),
    ]
    assert run.main(argv) == 0
    run_dir = tmp_path / "busi"
    results = pd.read_csv(run_dir / "results.csv")
    assert sorted(results.model) == ["adfa", "padim"]
    for name in ("pixel_AUROC", "pixel_AUPRO", "pixel_Dice", "pixel_IoU"):
        assert results[name].between(0, 1).all(), name
        assert (results[f"{name}_ci_low"] <= results[name]).all(), name
        assert (results[name] <= results[f"{name}_ci_high"]).all(), name
    # Label-free protocol: every model's pixel threshold at 95 % specificity on the held-out training normals.
    assert results.set_index("model").pixel_threshold_source.to_dict() == {"adfa": "val_spec95", "padim": "val_spec95"}
    table = (run_dir / "results.md").read_text()
    assert "## Localisation (datasets with masks)" in table
    assert "| BUSI | from_train | padim | 1 |" in table
    page = run_dir / "reports" / "report" / "index.html"
    assert "adfa (seed 1024)" in page.read_text()
    assert (page.parent / "roc_BUSI.png").is_file()


def test_report_names_the_commits_the_jobs_ran_at() -> None:
    rows = [{"commit": "abc1234"}, {"commit": "abc1234"}, {"commit": "def5678+"}, {}]
    assert run.code_description(rows) == "abc1234 (2 jobs), def5678+ (1 job), not recorded (1 job)"
    assert re.fullmatch(r"[0-9a-f]{7,}\+?|unknown", commit())


def test_the_recorded_commit_is_marked_changed_by_code_not_by_results(tmp_path: Path) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "results.md").write_text("old\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    clean = commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{7,}", clean)
    (tmp_path / "benchmarks" / "results" / "results.md").write_text("rewritten by a run\n")
    (tmp_path / "new_untracked.py").write_text("")
    assert commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert commit(tmp_path) == clean + "+"
    assert commit(tmp_path / "not_a_repository") == "unknown"


def test_report_dates_jobs_by_their_recorded_finish_time_only() -> None:
    same_day = [{"finished": "2026-12-03T00:32:05+00:00"}, {"finished": "2026-12-03T09:07:00+00:00"}]
    assert run.finished_span(same_day) == "finished between 2026-12-03 00:32 and 09:07 UTC"
    two_days = [{"finished": "2026-12-02T23:50:00+00:00"}, *same_day, {}, {}]
    assert run.finished_span(two_days) == (
        "finished between 2026-12-02 23:50 and 2026-12-03 09:07 UTC (2 jobs from before finish times were recorded)"
    )
    assert run.finished_span([{}]) == "finish times not recorded (1 job from before finish times were recorded)"


def _plot_width(tmp_path: Path, protocols: list[str]) -> int:
    labels, datasets = ["adfa", "padim", "patchcore"], ["brainmri", "covid"]
    rows = [
        {
            "dataset": dataset,
            "label": name,
            "protocol": protocol,
            "image_AUROC_mean": 0.8,
            "image_AUROC_ci_low_mean": 0.7,
            "image_AUROC_ci_high_mean": 0.9,
        }
        for dataset in datasets
        for name in labels
        for protocol in protocols
        if (name, protocol) != ("padim", protocols[-1])  # one cell not run
    ]
    path = tmp_path / f"{len(protocols)}.png"
    plot(pd.DataFrame(rows), labels, datasets, path)
    return Image.open(path).size[0]


def test_the_plot_puts_protocols_side_by_side_in_one_column_per_model(tmp_path: Path) -> None:
    # A column per model and protocol made the two-protocol ablation figure 3288 px wide; the width now follows the
    # models only.
    assert _plot_width(tmp_path, ["from_train", "paper"]) == _plot_width(tmp_path, ["paper"])
