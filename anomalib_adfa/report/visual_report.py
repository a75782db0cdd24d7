"""``anomalib-adfa report``: an offline HTML page showing where each model looked, next to where the lesion is.

The input is a *run folder*: any folder holding one or more ``report_data/`` folders written by
:class:`~anomalib_adfa.callbacks.EvaluationRecorder`: anomalib's ``results/<Model>/<Dataset>/vN`` after
``anomalib test ... --trainer.callbacks+=anomalib_adfa.callbacks.EvaluationRecorder``, a parent of several of them,
or a benchmark run folder (``benchmarks/results/<run>``, one ``report_data/<job>`` per job). The page and its
PNG figures go to ``<run folder>/report/``; it links no external resource, so it opens offline.

Contents: a summary table that leads with each run's decision (test sensitivity and specificity of ``pred_label`` with
exact Clopper-Pearson intervals, the target specificity, ``n`` normals behind the threshold, and the threshold in the
normalised units of the score CSV and the exported model, raw in brackets), then its AUROC and pixel metrics; per
dataset, the ROC curves of every run on one plot; per run, a
histogram of the raw scores of normal and abnormal test images with the image threshold, and three galleries
(the highest-scoring normal images, i.e. false alarms; the lowest-scoring abnormal ones, i.e. misses; typical
cases near the median score of each class), each case as the image with the lesion outline, and the heatmap
over it, with its score and the threshold. Heatmaps share one colour scale per run, stated under each gallery.
"""

from __future__ import annotations

import html
import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.patches import Rectangle
from PIL import Image
from sklearn.metrics import roc_curve

from anomalib_adfa.callbacks import REPORT_DATA_DIR
from anomalib_adfa.evaluation.conformal import clopper_pearson
from anomalib_adfa.evaluation.metrics import exact_auroc

CASES_PER_GALLERY = 4
HEATMAP_COLORMAP = "jet"
MAP_LOW_PERCENTILE = 50.0
"""The coldest colour is this percentile of the map values of the normal test images."""
MAP_HIGH_PERCENTILE = 99.5
"""The hottest colour is this percentile of the map values of all test images."""


@dataclass
class RunData:
    """One test run as saved by :class:`~anomalib_adfa.callbacks.EvaluationRecorder`."""

    folder: Path
    name: str
    dataset: str
    info: dict
    predictions: pd.DataFrame
    thumbnails: dict[str, np.ndarray]

    @property
    def slug(self) -> str:
        """File-name-safe identifier."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.dataset}__{self.name}")


def find_runs(folder: Path) -> list[RunData]:
    """Load every ``report_data/`` folder below ``folder`` (or ``folder`` itself), each once.

    Raises:
        FileNotFoundError: When there is none, saying how to produce one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        msg = f"run folder {folder} does not exist"
        raise FileNotFoundError(msg)
    candidates = [folder] if (folder / "run.json").is_file() else sorted(folder.rglob(f"{REPORT_DATA_DIR}/run.json"))
    seen: set[Path] = set()
    runs = []
    for info_path in candidates:
        data_dir = info_path.parent if info_path.name == "run.json" else info_path
        if data_dir.resolve() in seen:
            continue
        seen.add(data_dir.resolve())
        runs.append(_load(data_dir))
    if not runs:
        msg = (
            f"no {REPORT_DATA_DIR}/ folder under {folder}: test with "
            "--trainer.callbacks+=anomalib_adfa.callbacks.EvaluationRecorder (or run the benchmark) first"
        )
        raise FileNotFoundError(msg)
    names = [(run.dataset, run.name) for run in runs]
    for run in runs:  # two runs of one model on one dataset (anomalib's v0, v1): tell them apart by folder
        if names.count((run.dataset, run.name)) > 1:
            run.name = f"{run.name} ({run.folder.parent.name})"
    return runs


def _load(data_dir: Path) -> RunData:
    info = json.loads((data_dir / "run.json").read_text())
    predictions = pd.read_csv(data_dir / "predictions.csv")
    with np.load(data_dir / "thumbnails.npz") as archive:
        thumbnails = {key: archive[key] for key in archive.files}
    name = str(info.get("label") or info.get("model") or data_dir.parent.name)
    return RunData(data_dir, name, str(info.get("dataset") or "dataset"), info, predictions, thumbnails)


def write_report(folder: Path, output: Path | None = None, title: str | None = None) -> Path:
    """Write ``index.html`` and its PNG figures for every run below ``folder``.

    Args:
        folder: The run folder.
        output: Output folder, default ``<folder>/report``.
        title: Page title, default the run folder's name.

    Returns:
        The HTML file.
    """
    runs = find_runs(folder)
    output = Path(output) if output is not None else Path(folder) / "report"
    output.mkdir(parents=True, exist_ok=True)
    body = [
        f"<h1>Anomaly detection report: {html.escape(title or Path(folder).resolve().name)}</h1>",
        f"<p class='note'>Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from {len(runs)} run(s) in "
        f"<code>{html.escape(str(Path(folder).resolve()))}</code>. Scores are the models' raw image scores; "
        "thresholds are the post-processors' raw thresholds, labelled with where they were chosen "
        "(<code>val_spec95</code>: 95 % specificity on validation normals; <code>test_…</code>: chosen on the "
        "test set, i.e. test-calibrated).</p>",
        _metrics_table(runs),
    ]
    for dataset in dict.fromkeys(run.dataset for run in runs):
        members = [run for run in runs if run.dataset == dataset]
        roc = f"roc_{re.sub(r'[^A-Za-z0-9._-]+', '_', dataset)}.png"
        _plot_roc(members, dataset, output / roc)
        body += [f"<h2>{html.escape(dataset)}</h2>", _figure(roc, f"ROC curves of every run on {dataset}")]
        for run in members:
            body += _run_section(run, output)
    page = output / "index.html"
    page.write_text(_page("\n".join(body)))
    return page


# Summary columns: heading, then the logged metric names that fill it (first found; Dice/IoU carry a suffix).
_SUMMARY_COLUMNS = (
    ("pixel AUROC", ("pixel_AUROC",)),
    ("AUPRO (FPR ≤ 0.3)", ("pixel_AUPRO",)),
    ("Dice", ("pixel_Dice", "pixel_F1Score")),
    ("IoU", ("pixel_IoU",)),
)


def _pixel_values(run: RunData) -> dict[str, str]:
    """Pixel metrics of a run: the benchmark's (with 95 % CIs) when saved, else the logged ones."""
    saved = run.info.get("pixel_metrics")
    if saved:
        names = ("pixel_AUROC", "pixel_AUPRO", "pixel_Dice", "pixel_IoU")
        values = {
            heading: f"{saved[name]:.3f} [{saved[f'{name}_ci_low']:.3f}, {saved[f'{name}_ci_high']:.3f}]"
            for (heading, _), name in zip(_SUMMARY_COLUMNS, names, strict=True)
        }
        return {**values, "threshold": str(saved.get("pixel_threshold_source", ""))}
    metrics = run.info.get("metrics", {})
    values = {"threshold": ""}
    for heading, prefixes in _SUMMARY_COLUMNS:
        found = [name for prefix in prefixes for name in metrics if name.split("@")[0] == prefix]
        values[heading] = f"{metrics[found[0]]:.3f}" if found else "-"
        if found and "@" in found[0]:
            values["threshold"] = found[0].split("@", 1)[1]
    return values


_DECISION_HEADINGS = ("Sensitivity [95% CI]", "Specificity [95% CI]", "Target spec.", "n normals", "Threshold [raw]")


def _decision_values(run: RunData) -> list[str]:
    """Sensitivity and specificity at the run's image threshold with Clopper-Pearson intervals, target, n, threshold.

    Decisions are recomputed from the raw scores and the raw threshold (``score > threshold``), as ``pred_label``.
    """
    threshold = run.info.get("image_threshold")
    if threshold is None or not np.isfinite(threshold):
        return ["-"] * len(_DECISION_HEADINGS)
    labels, scores = run.predictions.gt_label.to_numpy(), run.predictions.pred_score.to_numpy()
    flagged = scores > threshold
    cells = []
    for positive, decided in ((1, flagged), (0, ~flagged)):
        chosen = labels == positive
        hits, total = int((decided & chosen).sum()), int(chosen.sum())
        low, high = clopper_pearson(hits, total)
        cells.append(f"{hits / total:.3f} [{low:.3f}, {high:.3f}] ({hits}/{total})" if total else "-")
    target, count = run.info.get("target_specificity"), run.info.get("threshold_normals")
    normalized = run.info.get("image_threshold_normalized")
    cells += [
        f"{target:g}" if target is not None else "-",
        str(count) if count is not None else "-",
        f"{_fmt(normalized)} [{_fmt(threshold)}]" if normalized is not None else f"[{_fmt(threshold)}]",
    ]
    return cells


def _metrics_table(runs: list[RunData]) -> str:
    headings = [
        "Dataset",
        "Run",
        *_DECISION_HEADINGS,
        "Threshold set on",
        "Test images",
        "image AUROC",
        *(h for h, _ in _SUMMARY_COLUMNS),
        "Dice/IoU threshold",
    ]
    rows = []
    for run in runs:
        labels, scores = run.predictions.gt_label.to_numpy(), run.predictions.pred_score.to_numpy()
        image_auroc = f"{exact_auroc(scores, labels):.3f}" if len(set(labels.tolist())) == 2 else "-"
        pixel = _pixel_values(run)
        source = run.info.get("threshold_calibration") or run.info.get("image_threshold_source", "")
        cells = [run.dataset, run.name, *_decision_values(run), source]
        cells += [f"{len(labels)} ({int(labels.sum())} abnormal)", image_auroc]
        cells += [pixel[heading] for heading, _ in _SUMMARY_COLUMNS] + [pixel["threshold"]]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(heading)}</th>" for heading in headings)
    resolution = ", ".join(sorted({str(run.info.get("mask_resolution", "input")) for run in runs}))
    caption = (
        "Operating point first: sensitivity (abnormal test images flagged) and specificity (normal test images "
        "cleared) of the decision the model outputs, with exact binomial (Clopper-Pearson) 95 % intervals and counts; "
        "the target specificity; n, the normal images the threshold was set on and where they came from; the threshold "
        "in the normalised units of the score CSV and the exported model (0.5 for ADFA's post-processor), the raw "
        "threshold in brackets. Image AUROC from the raw scores. "
        "Pixel metrics from the raw maps, with 95 % bootstrap CIs over images where "
        f"the benchmark computed them, else as logged at test time; masks compared at the {resolution} resolution "
        "(input: after resize and centre crop; original: in the image's frame). AUPRO: anomalib's, up to a "
        "pixel false-positive rate of 0.3. Dice/IoU threshold: where the pixel threshold was chosen "
        "(<code>val_spec95</code>: 95 % specificity on validation normals, label-free; <code>val_normal_max</code>: "
        "anomalib's F1 threshold on a validation set without anomalies, i.e. its highest normal value; "
        "<code>test_…</code>: on the test set, so optimistic)."
    )
    return f"<table><caption>{caption}</caption><tr>{header}</tr>{''.join(rows)}</table>"


def _logged_metrics(run: RunData) -> str:
    metrics = run.info.get("metrics", {})
    if not metrics:
        return ""
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{value:.4f}</td></tr>" for name, value in metrics.items())
    return f"<details><summary>All metrics logged at test time</summary><table>{rows}</table></details>"


def _figure(source: str, caption: str) -> str:
    image = f"<img src='{html.escape(source)}' alt='{html.escape(caption)}'>"
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def _plot_roc(runs: list[RunData], dataset: str, path: Path) -> None:
    """One curve per run: one colour per model (the run name before `` (``), one line style per repeat."""
    models = list(dict.fromkeys(run.name.split(" (")[0] for run in runs))
    colours = colormaps["tab10"].colors
    styles = ("-", "--", ":", "-.")
    figure, axis = plt.subplots(figsize=(7.6, 4.6))
    repeats: dict[str, int] = {}
    for run in runs:
        labels, scores = run.predictions.gt_label.to_numpy(), run.predictions.pred_score.to_numpy()
        if len(set(labels.tolist())) < 2:
            continue
        model = run.name.split(" (")[0]
        repeat = repeats[model] = repeats.get(model, -1) + 1
        fpr, tpr, _ = roc_curve(labels, scores)
        axis.plot(
            fpr,
            tpr,
            label=f"{run.name} (AUROC {exact_auroc(scores, labels):.3f})",
            color=colours[models.index(model) % len(colours)],
            linestyle=styles[repeat % len(styles)],
            linewidth=1.6,
        )
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(xlabel="false-positive rate (normal images flagged)", ylabel="true-positive rate (abnormal found)")
    axis.set_aspect("equal")
    axis.set_title(f"{dataset}: image-level ROC", fontsize=10)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


def _run_section(run: RunData, output: Path) -> list[str]:
    threshold = run.info.get("image_threshold")
    source = run.info.get("image_threshold_source", "")
    hist = f"{run.slug}_histogram.png"
    _plot_histogram(run, threshold, output / hist)
    parts = [
        f"<h3>{html.escape(run.name)}</h3>",
        f"<p class='note'>Image threshold {_fmt(run.info.get('image_threshold_normalized'))} normalised, raw "
        f"{_fmt(threshold)} ({html.escape(source)}); pixel threshold "
        f"{_fmt(run.info.get('pixel_threshold'))} ({html.escape(run.info.get('pixel_threshold_source', ''))}).</p>",
        _logged_metrics(run),
        _figure(hist, "Raw image scores of the normal and abnormal test images, with the image threshold"),
    ]
    low, high = _colour_scale(run)
    scale = (
        f"Heatmap colour scale, fixed for this run: {HEATMAP_COLORMAP} from {low:.3g} (blue: the median map value "
        f"of the normal test images) to {high:.3g} (red: the {MAP_HIGH_PERCENTILE}th percentile of all test map "
        "values). Green: lesion outline (ground truth); dashed white box: the part of the image the model saw."
    )
    for title, indices in _galleries(run):
        if not indices:
            continue
        name = f"{run.slug}_{title.split(':')[0].lower().replace(' ', '_')}.png"
        _plot_cases(run, indices, threshold, (low, high), output / name)
        parts.append(_figure(name, f"{html.escape(title)}. {scale}"))
    return parts


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4g}"


def _plot_histogram(run: RunData, threshold: float | None, path: Path) -> None:
    scores, labels = run.predictions.pred_score.to_numpy(), run.predictions.gt_label.to_numpy()
    figure, axis = plt.subplots(figsize=(6, 3.2))
    bins = np.histogram_bin_edges(scores, bins=min(40, max(5, len(scores) // 3)))
    # Abnormal first, normal drawn over it with an outline, so neither hides the other.
    for label, colour, name in ((1, "tab:red", "abnormal"), (0, "tab:blue", "normal")):
        chosen = scores[labels == label]
        if chosen.size:
            axis.hist(
                chosen,
                bins=bins,
                alpha=0.5,
                color=colour,
                edgecolor=colour,
                linewidth=1.5,
                label=f"{name} ({chosen.size})",
            )
    if threshold is not None and np.isfinite(threshold):
        axis.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.4g}")
    axis.set(xlabel="raw image score", ylabel="test images")
    axis.set_title(f"{run.name}: score distribution", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def _galleries(run: RunData) -> list[tuple[str, list[int]]]:
    scores, labels = run.predictions.pred_score.to_numpy(), run.predictions.gt_label.to_numpy()
    normal, abnormal = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    false_alarms = normal[np.argsort(-scores[normal], kind="stable")][:CASES_PER_GALLERY].tolist()
    misses = abnormal[np.argsort(scores[abnormal], kind="stable")][:CASES_PER_GALLERY].tolist()
    typical = []
    for group in (abnormal, normal):
        if group.size:
            by_distance = group[np.argsort(np.abs(scores[group] - np.median(scores[group])), kind="stable")]
            typical += [int(i) for i in by_distance[: CASES_PER_GALLERY // 2] if int(i) not in typical]
    return [
        ("False alarms: the highest-scoring normal test images", false_alarms),
        ("Misses: the lowest-scoring abnormal test images", misses),
        ("Typical cases: abnormal and normal test images nearest their class's median score", typical),
    ]


def _colour_scale(run: RunData) -> tuple[float, float]:
    labels = run.predictions.gt_label.to_numpy()
    keys = {i: f"map_{i}" for i in range(len(labels)) if f"map_{i}" in run.thumbnails}
    maps = {i: run.thumbnails[key].astype(np.float64) for i, key in keys.items()}
    if not maps:
        return 0.0, 1.0
    normal = [values for i, values in maps.items() if labels[i] == 0] or list(maps.values())
    low = float(np.percentile(np.concatenate([m.ravel() for m in normal]), MAP_LOW_PERCENTILE))
    high = float(np.percentile(np.concatenate([m.ravel() for m in maps.values()]), MAP_HIGH_PERCENTILE))
    return low, max(high, low + 1e-12)


def _plot_cases(
    run: RunData, indices: list[int], threshold: float | None, scale: tuple[float, float], path: Path
) -> None:
    height, width = run.thumbnails[f"image_{indices[0]}"].shape[:2]
    panel = 2.3
    figure = plt.figure(figsize=(panel * len(indices) + 0.9, 2 * panel * height / width + 0.9))
    grid = figure.add_gridspec(
        2, len(indices) + 1, width_ratios=[1.0] * len(indices) + [0.06], wspace=0.04, hspace=0.04
    )
    axes = np.array([[figure.add_subplot(grid[row, column]) for column in range(len(indices))] for row in (0, 1)])
    mappable = None
    for column, index in enumerate(indices):
        row = run.predictions.iloc[index]
        image = run.thumbnails[f"image_{index}"]
        mask = run.thumbnails.get(f"mask_{index}")
        heat = run.thumbnails.get(f"map_{index}")
        box = run.thumbnails.get(f"box_{index}")
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(image, cmap="gray" if image.ndim == 2 else None)
        bottom.imshow(image, cmap="gray" if image.ndim == 2 else None)
        if heat is not None:
            mappable = bottom.imshow(
                heat.astype(np.float32), cmap=HEATMAP_COLORMAP, vmin=scale[0], vmax=scale[1], alpha=0.5
            )
        for axis in (top, bottom):
            if mask is not None and mask.any():
                axis.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
            if box is not None:
                y, x, height, width = box
                axis.add_patch(
                    Rectangle((x - 0.5, y - 0.5), width, height, fill=False, edgecolor="white", linestyle="--", lw=0.8)
                )
            axis.set_axis_off()
        flagged = threshold is not None and np.isfinite(threshold) and row.pred_score > threshold
        verdict = "flagged" if flagged else "not flagged"
        label = "abnormal" if int(row.gt_label) == 1 else "normal"
        name = Path(str(row.image_path)).name
        title = f"{name[:28]}\n{label}; score {row.pred_score:.4g}\n(threshold {_fmt(threshold)}: {verdict})"
        top.set_title(title, fontsize=7)
    if mappable is not None:
        figure.colorbar(mappable, cax=figure.add_subplot(grid[1, -1]), label="raw anomaly map")
    _save(figure, path, bbox_inches="tight")


def _save(figure: plt.Figure, path: Path, **options: Any) -> None:
    """Save a figure as a 256-colour PNG (about a third of the size of a full-colour one)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, **options)
    plt.close(figure)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def _page(body: str) -> str:
    style = (
        "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;"
        "color:#1d1d1f;line-height:1.4}h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;"
        "margin-top:2em}h3{margin-top:1.6em}table{border-collapse:collapse;font-size:.8em;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}"
        "td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}caption{caption-side:bottom;text-align:left;color:#555;padding-top:4px;white-space:normal}"
        "figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption,.note{color:#555;font-size:.85em}"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Anomaly detection report</title>"
        f"<style>{style}</style></head><body>\n{body}\n</body></html>\n"
    )
