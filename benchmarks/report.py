"""Turn the per-job results of a run into ``results.csv``, a markdown report and a plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
    "fit_s",
    "train_s",
    "test_ms_per_image",
    "peak_rss_mb",
)

_PIXEL_METRICS = ("pixel_AUROC", "pixel_AUPRO", "pixel_Dice", "pixel_IoU")
_PIXEL_SUMMARY = tuple(f"{name}{part}" for name in _PIXEL_METRICS for part in ("", "_ci_low", "_ci_high"))


def label(frame: pd.DataFrame) -> pd.Series:
    """Row label of each result: the model name, or the ADFA variant for ablation rows."""
    variant = frame.get("variant", pd.Series("", index=frame.index)).fillna("")
    return frame["model"].where(variant == "", variant)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every metric, per dataset and model (or variant).

    Args:
        results: One row per job, as in ``results.csv``.

    Returns:
        One row per dataset and label with ``<metric>_mean``/``<metric>_std``, ``seeds``, ``status`` and ``error``.
    """
    frame = results.assign(label=label(results))
    rows = []
    for (dataset, name), group in frame.groupby(["dataset", "label"], sort=False):
        done = group[group.status == "ok"]
        row = {"dataset": dataset, "label": name, "seeds": len(done)}
        for metric in _SUMMARY_METRICS + _PIXEL_SUMMARY:
            values = done[metric].astype(float) if metric in done else pd.Series(dtype=float)
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=0) if len(values) > 1 else np.nan
        sources = done.get("pixel_threshold_source", pd.Series(dtype=object)).dropna()
        row["pixel_threshold_source"] = ", ".join(sorted(set(map(str, sources))))
        row["mismatches"] = int(done["auroc_mismatch"].fillna(value=False).astype(bool).sum()) if len(done) else 0
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

    Cells are the mean ± std over seeds of the raw-score image AUROC; per dataset the best is bold and the second
    best underlined. Models that did not run show their status.

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
        "| Dataset | Model | Seeds | AUROC (raw) | AUROC (anomalib) | 95% CI | F1 (best) | Pixel AUROC | "
        "Fit s (train) | Test ms/img | Peak RSS MB | Note |"
    )
    lines = [columns, "|" + "---|" * 12]

    def fmt(value: float, digits: int = 3) -> str:
        return "n/a" if np.isnan(value) else f"{value:.{digits}f}"

    for _, row in summary.iterrows():
        note = row.error if row.status != "ok" else ""
        if row.mismatches:
            note = f"raw and anomalib AUROC differ by > 0.005 in {row.mismatches} seed(s). {note}"
        ci = f"[{fmt(row.image_AUROC_ci_low_mean)}, {fmt(row.image_AUROC_ci_high_mean)}]"
        lines.append(
            f"| {DATASET_TITLES.get(row.dataset, row.dataset)} | {row.label} | {row.seeds} | "
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
        "| Dataset | Model | Seeds | Pixel AUROC | AUPRO (FPR ≤ 0.3) | Dice | IoU | Dice/IoU threshold |",
        "|" + "---|" * 8,
    ]
    for _, row in rows.iterrows():
        cells = [
            f"{row[f'{name}_mean']:.3f} [{row[f'{name}_ci_low_mean']:.3f}, {row[f'{name}_ci_high_mean']:.3f}]"
            for name in _PIXEL_METRICS
        ]
        lines.append(
            f"| {DATASET_TITLES.get(row.dataset, row.dataset)} | {row.label} | {row.seeds} | "
            + " | ".join(cells)
            + f" | {row.pixel_threshold_source} |"
        )
    return "\n".join(lines)


def plot(summary: pd.DataFrame, labels: Sequence[str], datasets: Sequence[str], path: Path) -> None:
    """Mean image AUROC per dataset and model, with the mean per-seed 95% bootstrap CI as error bars.

    Args:
        summary: Output of :func:`summarise`.
        labels: Bar order.
        datasets: One panel per dataset.
        path: PNG file to write.
    """
    figure, axes = plt.subplots(1, len(datasets), figsize=(1 + 0.6 * len(labels) * len(datasets), 4.2), squeeze=False)
    indexed = summary.set_index(["dataset", "label"])
    for axis, dataset in zip(axes[0], datasets, strict=True):
        means, lows, highs = [], [], []
        for name in labels:
            row = indexed.loc[(dataset, name)] if (dataset, name) in indexed.index else None
            mean = np.nan if row is None else row.image_AUROC_mean
            means.append(mean)
            lows.append(0.0 if np.isnan(mean) else mean - row.image_AUROC_ci_low_mean)
            highs.append(0.0 if np.isnan(mean) else row.image_AUROC_ci_high_mean - mean)
        positions = np.arange(len(labels))
        axis.errorbar(positions, means, yerr=[lows, highs], fmt="o", capsize=4, color="tab:blue")
        for position, mean in zip(positions, means, strict=True):
            if np.isnan(mean):
                axis.text(position, 0.52, "not run", rotation=90, ha="center", va="bottom", fontsize=8)
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axis.set_xticks(positions, labels, rotation=45, ha="right", fontsize=8)
        floor = np.nanmin(np.asarray(means) - np.asarray(lows)) if not np.isnan(means).all() else 0.5
        axis.set_ylim(min(0.4, floor - 0.05), 1.02)
        axis.grid(axis="y", alpha=0.3)
        axis.set_title(DATASET_TITLES.get(dataset, dataset))
        axis.set_ylabel("image AUROC (mean over seeds)")
    figure.suptitle("Image AUROC (mean over seeds); error bars: mean of the per-seed 95% bootstrap CIs", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
