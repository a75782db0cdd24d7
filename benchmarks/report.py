"""Turn the per-job results of a run into ``results.csv``, a markdown report and a plot.

Metric tables are built from column groups (:data:`OPERATING_POINT_COLUMNS`, :func:`column_table`), so further
groups (e.g. pixel metrics) add a tuple of :class:`Column` and a section, without touching the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

DATASET_TITLES = {"brainmri": "BrainMRI", "covid": "Covid", "busi": "BUSI", "sipakmed": "SIPaKMeD"}

_SUMMARY_METRICS = (
    "image_AUROC",
    "anomalib_image_AUROC",
    "image_F1_best",
    "image_AUROC_ci_low",
    "image_AUROC_ci_high",
    "test_sensitivity",
    "test_sensitivity_ci_low",
    "test_sensitivity_ci_high",
    "test_specificity",
    "test_specificity_ci_low",
    "test_specificity_ci_high",
    "test_sensitivity_cp_low",
    "test_sensitivity_cp_high",
    "test_specificity_cp_low",
    "test_specificity_cp_high",
    "threshold_normals",
    "calibration_gap",
    "test_normals_above_calibration_median",
    "anomalib_image_AUPR",
    "anomalib_image_Sensitivity_at_Spec95",
    "anomalib_image_Sensitivity",
    "anomalib_image_Specificity",
    "anomalib_image_PPV",
    "anomalib_image_NPV",
    "anomalib_image_BalancedAccuracy",
    "selected_epoch",
    "train_normal",
    "val_normal",
    "fit_s",
    "train_s",
    "test_ms_per_image",
    "peak_rss_mb",
)

_PIXEL_METRICS = ("pixel_AUROC", "pixel_AUPRO", "pixel_Dice", "pixel_IoU")
_PIXEL_SUMMARY = tuple(f"{name}{part}" for name in _PIXEL_METRICS for part in ("", "_ci_low", "_ci_high"))


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A data frame as a markdown table (floats rounded to ``digits``), without pandas' optional tabulate."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if np.isnan(value) else f"{value:.{digits}f}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def label(frame: pd.DataFrame) -> pd.Series:
    """Row label of each result: the model name, or the ADFA variant for ablation rows."""
    variant = frame.get("variant", pd.Series("", index=frame.index)).fillna("")
    return frame["model"].where(variant == "", variant)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (n - 1) over seeds of every metric, per dataset and model (or variant).

    Args:
        results: One row per job, as in ``results.csv``.

    Returns:
        One row per dataset and label with ``<metric>_mean``/``<metric>_std``, ``seeds``, ``status`` and ``error``.
    """
    frame = results.assign(label=label(results))
    if "protocol" not in frame:
        frame["protocol"] = "paper"
    rows = []
    for (dataset, name, protocol), group in frame.groupby(["dataset", "label", "protocol"], sort=False):
        done = group[group.status == "ok"]
        row = {"dataset": dataset, "label": name, "protocol": protocol, "seeds": len(done)}
        for metric in _SUMMARY_METRICS + _PIXEL_SUMMARY:
            values = done[metric].astype(float) if metric in done else pd.Series(dtype=float)
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        sources = done.get("pixel_threshold_source", pd.Series(dtype=object)).dropna()
        row["pixel_threshold_source"] = ", ".join(sorted(set(map(str, sources))))
        row["mismatches"] = int(done["auroc_mismatch"].fillna(value=False).astype(bool).sum()) if len(done) else 0
        flags = done["threshold_mismatch"] if "threshold_mismatch" in done else pd.Series(dtype=bool)
        row["threshold_mismatches"] = int(flags.fillna(value=False).astype(bool).sum())
        failed = group[group.status != "ok"]
        row["status"] = "ok" if failed.empty else str(failed.status.iloc[0])
        row["error"] = "" if failed.empty else str(failed.error.iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float, rank: int | None) -> str:
    if np.isnan(mean):
        return "n/a"
    text = f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"
    if rank == 0:
        return f"**{text}**"
    if rank == 1:
        return f"<u>{text}</u>"
    return text


def auroc_table(summary: pd.DataFrame, labels: Sequence[str], datasets: Sequence[str], row_title: str = "Model") -> str:
    """Markdown table laid out as the paper's Table 1: one row per model, one column per dataset.

    Cells are the mean ± sample standard deviation (n - 1) over seeds of the raw-score image AUROC; per dataset the
    best is bold and the second best underlined. Models that did not run show their status.

    Args:
        summary: Output of :func:`summarise`.
        labels: Row order.
        datasets: Column order.
        row_title: Heading of the first column.

    Returns:
        The table.
    """
    header = f"| {row_title} | " + " | ".join(DATASET_TITLES.get(d, d) for d in datasets) + " |"
    lines = [header, "|" + "---|" * (len(datasets) + 1)]
    indexed = summary.set_index(["dataset", "label"])
    ranks: dict[tuple[str, str], int] = {}
    for dataset in datasets:
        scores = summary[(summary.dataset == dataset) & summary.image_AUROC_mean.notna()]
        rounded = scores.image_AUROC_mean.round(3)
        distinct = sorted(set(rounded), reverse=True)
        for name, value in zip(scores.label, rounded, strict=True):
            ranks[(dataset, name)] = distinct.index(value)
    for name in labels:
        cells = []
        for dataset in datasets:
            if (dataset, name) not in indexed.index:
                cells.append("-")
                continue
            row = indexed.loc[(dataset, name)]
            if row.seeds == 0:
                cells.append(str(row.status))
                continue
            cells.append(_cell(row.image_AUROC_mean, row.image_AUROC_std, ranks.get((dataset, name))))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details_table(summary: pd.DataFrame) -> str:
    """Markdown table of every metric, cost and status per dataset and model.

    Args:
        summary: Output of :func:`summarise`.

    Returns:
        The table.
    """
    columns = (
        "| Dataset | Model | Protocol | Seeds | AUROC (raw) | AUROC (anomalib) | 95% CI | "
        "F1 oracle (test-calibrated) | Pixel AUROC | Fit s (train) | Test ms/img | Peak RSS MB | Note |"
    )
    lines = [columns, "|" + "---|" * 13]

    def fmt(value: float, digits: int = 3) -> str:
        return "n/a" if np.isnan(value) else f"{value:.{digits}f}"

    for _, row in summary.iterrows():
        note = row.error if row.status != "ok" else ""
        if row.mismatches:
            note = f"raw and anomalib AUROC differ by > 0.005 in {row.mismatches} seed(s). {note}"
        if row.get("threshold_mismatches", 0):
            count = row.threshold_mismatches
            note = f"post-processor threshold differs from the recomputed one in {count} seed(s). {note}"
        ci = f"[{fmt(row.image_AUROC_ci_low_mean)}, {fmt(row.image_AUROC_ci_high_mean)}]"
        lines.append(
            f"| {DATASET_TITLES.get(row.dataset, row.dataset)} | {row.label} | {row.protocol} | {row.seeds} | "
            f"{fmt(row.image_AUROC_mean)} | {fmt(row.anomalib_image_AUROC_mean)} | {ci} | "
            f"{fmt(row.image_F1_best_mean)} | {fmt(row.pixel_AUROC_mean)} | "
            f"{fmt(row.fit_s_mean, 1)} ({fmt(row.train_s_mean, 1)}) | {fmt(row.test_ms_per_image_mean, 1)} | "
            f"{fmt(row.peak_rss_mb_mean, 0)} | {note.replace('|', '/')} |"
        )
    return "\n".join(lines)


def pixel_table(summary: pd.DataFrame) -> str:
    """Markdown table of the pixel metrics (mean over seeds, with the mean of the per-seed 95% bootstrap CIs).

    Args:
        summary: Output of :func:`summarise`.

    Returns:
        The table, or ``""`` when no job has pixel metrics.
    """
    rows = summary[summary.pixel_AUROC_mean.notna()]
    if rows.empty:
        return ""
    lines = [
        "| Dataset | Protocol | Model | Seeds | Pixel AUROC | AUPRO (FPR ≤ 0.3) | Dice | IoU | Dice/IoU threshold |",
        "|" + "---|" * 9,
    ]
    for _, row in rows.iterrows():
        cells = [
            f"{row[f'{name}_mean']:.3f} [{row[f'{name}_ci_low_mean']:.3f}, {row[f'{name}_ci_high_mean']:.3f}]"
            for name in _PIXEL_METRICS
        ]
        lines.append(
            f"| {DATASET_TITLES.get(row.dataset, row.dataset)} | {row.protocol} | {row.label} | {row.seeds} | "
            + " | ".join(cells)
            + f" | {row.pixel_threshold_source} |"
        )
    return "\n".join(lines)


class Column(NamedTuple):
    """One column of a metric table: heading, summary metric, and the metrics of its interval (or ``None``).

    ``signed`` prints a sign, ``digits`` the decimals, ``bare`` the interval alone.
    """

    heading: str
    metric: str
    interval: tuple[str, str] | None = None
    signed: bool = False
    digits: int = 3
    bare: bool = False


OPERATING_POINT_COLUMNS = (
    Column("Sensitivity [CP 95%]", "test_sensitivity", ("test_sensitivity_cp_low", "test_sensitivity_cp_high")),
    Column("Specificity [CP 95%]", "test_specificity", ("test_specificity_cp_low", "test_specificity_cp_high")),
    Column("n normals", "threshold_normals", digits=0),
    Column("Calibration gap", "calibration_gap", signed=True),
    Column("Test normals > calib. median", "test_normals_above_calibration_median", digits=2),
    Column(
        "Spec. bootstrap CI", "test_specificity", ("test_specificity_ci_low", "test_specificity_ci_high"), bare=True
    ),
    Column("PPV", "anomalib_image_PPV"),
    Column("NPV", "anomalib_image_NPV"),
    Column("Sens. @ 95% test spec. (oracle)", "anomalib_image_Sensitivity_at_Spec95"),
    Column("AUPR", "anomalib_image_AUPR"),
    Column("F1 oracle (test-calibrated)", "image_F1_best"),
)
"""Operating-point group: at the threshold set on normals (Clopper-Pearson intervals over the test images; ``n``
normals behind the threshold; the bootstrap interval also resamples those normals), then threshold-free and
test-calibrated references."""


def column_table(
    summary: pd.DataFrame,
    labels: Sequence[str],
    datasets: Sequence[str],
    protocols: Sequence[str],
    columns: Sequence[Column],
) -> str:
    """Markdown table with one row per dataset, protocol and model, one column per :class:`Column`.

    Args:
        summary: Output of :func:`summarise`.
        labels: Model order.
        datasets: Dataset order.
        protocols: Protocol order.
        columns: The metric columns.

    Returns:
        The table (cells: mean over seeds, with ``[low, high]`` = mean of the per-seed intervals).
    """

    def value(row: pd.Series, metric: str) -> float:
        return float(row.get(f"{metric}_mean", np.nan))

    lines = [
        "| Dataset | Protocol | Model | " + " | ".join(column.heading for column in columns) + " |",
        "|" + "---|" * (3 + len(columns)),
    ]
    indexed = summary.set_index(["dataset", "label", "protocol"])
    for dataset in datasets:
        for protocol in protocols:
            for name in labels:
                if (dataset, name, protocol) not in indexed.index:
                    continue
                row = indexed.loc[(dataset, name, protocol)]
                cells = []
                for column in columns:
                    mean = value(row, column.metric)
                    sign = "+" if column.signed else ""
                    text = "n/a" if np.isnan(mean) else f"{mean:{sign}.{column.digits}f}"
                    if column.interval is not None and not np.isnan(mean):
                        low, high = (value(row, metric) for metric in column.interval)
                        bounds = "n/a" if np.isnan(low) else f"[{low:.2f}, {high:.2f}]"
                        text = bounds if column.bare else f"{text} {bounds}"
                    cells.append(text)
                title = DATASET_TITLES.get(dataset, dataset)
                lines.append(f"| {title} | {protocol} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def operating_point_table(
    summary: pd.DataFrame, labels: Sequence[str], datasets: Sequence[str], protocols: Sequence[str]
) -> str:
    """:func:`column_table` of :data:`OPERATING_POINT_COLUMNS`."""
    return column_table(summary, labels, datasets, protocols, OPERATING_POINT_COLUMNS)


def protocol_auroc_table(
    summary: pd.DataFrame, labels: Sequence[str], datasets: Sequence[str], protocols: Sequence[str]
) -> str:
    """Image AUROC (mean ± sample SD over seeds) with one column per dataset and protocol."""
    header = [f"{DATASET_TITLES.get(d, d)} ({p})" for d in datasets for p in protocols]
    lines = ["| Model | " + " | ".join(header) + " |", "|" + "---|" * (1 + len(header))]
    indexed = summary.set_index(["dataset", "label", "protocol"])
    for name in labels:
        cells = []
        for dataset in datasets:
            for protocol in protocols:
                key = (dataset, name, protocol)
                row = indexed.loc[key] if key in indexed.index else None
                cells.append("-" if row is None else _cell(row.image_AUROC_mean, row.image_AUROC_std, None))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAPER_TABLE1 = {
    "columns": ("PaDiM", "SPADE", "Patch SVDD", "STPM", "RDAD", "f-AnoGAN", "ADFA"),
    "BrainMRI": (0.843, 0.682, 0.647, 0.821, 0.856, 0.733, 0.857),
    "Covid": (0.695, 0.680, 0.918, 0.757, 0.908, 0.982, 0.973),
    "BUSI": (0.948, 0.945, 0.751, 0.796, 0.862, 0.785, 0.966),
    "SIPaKMeD": (0.754, 0.896, 0.935, 0.792, 0.784, 0.828, 0.972),
}
"""ADFA paper, Table 1: image AUROC (WR50, 224 px, 200 epochs)."""

PAPER_TABLE3 = {
    "columns": ("BrainMRI", "Covid", "BUSI", "SIPaKMeD"),
    "attention eps 0": (0.858, 0.963, 0.958, 0.964),
    "attention eps 0.05": (0.858, 0.967, 0.962, 0.971),
    "attention eps 0.1 (default)": (0.857, 0.973, 0.966, 0.972),
    "attention eps 0.2": (0.855, 0.970, 0.965, 0.972),
    "PyTorch (hard) top-k": (0.844, 0.917, 0.952, 0.958),
    "randomly initialised WR50": (0.577, 0.470, 0.591, 0.512),
}
"""ADFA paper, Table 3: ADFA ablation, image AUROC."""


def paper_tables() -> list[str]:
    """The ADFA paper's Table 1 and Table 3 as markdown lines, to read beside our results."""
    lines = ["## The ADFA paper's numbers (WR50, 224 px, 200 epochs; their protocol validates on nothing)", ""]
    for title, table, first in (
        ("Table 1 (image AUROC)", PAPER_TABLE1, "Dataset"),
        ("Table 3 (ADFA ablation, image AUROC)", PAPER_TABLE3, "Variant"),
    ):
        columns = table["columns"]
        lines += [f"{title}:", "", f"| {first} | " + " | ".join(columns) + " |", "|" + "---|" * (1 + len(columns))]
        lines += [
            f"| {name} | " + " | ".join(f"{value:.3f}" for value in values) + " |"
            for name, values in table.items()
            if name != "columns"
        ]
        lines.append("")
    return lines


PROTOCOL_COLOURS = {"paper": "tab:blue", "synthetic": "tab:green", "from_train": "tab:orange", "crossfit": "tab:purple"}
"""One colour per benchmark protocol, the same in every run's figure."""


def plot(summary: pd.DataFrame, labels: Sequence[str], datasets: Sequence[str], path: Path) -> None:
    """Mean image AUROC per dataset and model, with the mean per-seed 95% bootstrap CI as error bars.

    One panel per dataset and one column per label; with several protocols their points stand side by side in each
    column, one colour per protocol, so the width grows with the labels only.

    Args:
        summary: Output of :func:`summarise`.
        labels: Column order.
        datasets: One panel per dataset.
        path: PNG file to write.
    """
    protocols = list(dict.fromkeys(summary.protocol))
    width = 0.7 / len(protocols)
    panel_width = max(3.6, 0.9 + 0.6 * len(labels))  # room for the y label and the legend with a single column
    figure, axes = plt.subplots(1, len(datasets), figsize=(panel_width * len(datasets), 4.4), squeeze=False)
    indexed = summary.set_index(["dataset", "label", "protocol"])
    for axis, dataset in zip(axes[0], datasets, strict=True):
        floor = 0.5
        for number, protocol in enumerate(protocols):
            means, lows, highs = [], [], []
            for name in labels:
                key = (dataset, name, protocol)
                row = indexed.loc[key] if key in indexed.index else None
                mean = np.nan if row is None else row.image_AUROC_mean
                means.append(mean)
                lows.append(0.0 if np.isnan(mean) else mean - row.image_AUROC_ci_low_mean)
                highs.append(0.0 if np.isnan(mean) else row.image_AUROC_ci_high_mean - mean)
            positions = np.arange(len(labels)) + (number - (len(protocols) - 1) / 2) * width
            shown = protocol if len(protocols) > 1 else None
            colour = PROTOCOL_COLOURS.get(protocol, "tab:grey")
            axis.errorbar(positions, means, yerr=[lows, highs], fmt="o", capsize=3, color=colour, label=shown)
            for position, mean in zip(positions, means, strict=True):
                if np.isnan(mean):
                    axis.text(position, 0.52, "not run", rotation=90, ha="center", va="bottom", fontsize=7)
            if not np.isnan(means).all():
                floor = min(floor, np.nanmin(np.asarray(means) - np.asarray(lows)))
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axis.set_xticks(np.arange(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        axis.set_xlim(-0.6, len(labels) - 0.4)
        axis.set_ylim(min(0.4, floor - 0.05), 1.02)
        axis.grid(axis="y", alpha=0.3)
        axis.set_title(DATASET_TITLES.get(dataset, dataset))
        axis.set_ylabel("image AUROC (mean over seeds)")
        if len(protocols) > 1:
            axis.legend(title="protocol", fontsize=7, title_fontsize=8, loc="lower left")
    figure.suptitle("Image AUROC (mean over seeds)\nerror bars: mean of the per-seed 95% bootstrap CIs", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
