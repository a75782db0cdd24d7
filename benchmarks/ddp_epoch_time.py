"""Training epoch time of ADFA with 1 and with N CPU processes (Lightning DDP, gloo).

Each configuration runs in its own subprocess (this script with ``--worker``), so that Lightning's DDP launcher
can start the other ranks by re-running the same command. Rank 0 measures, with a callback:

* ``centres``: from the start of training to the first epoch (the centre pass, which also fills the feature cache),
* ``epoch k``: wall time of training epoch ``k`` (no validation: ``limit_val_batches=0``),

and the feature-cache hit rate of each epoch (in brackets). The data are synthetic head phantoms (BrainMRI-sized
by default: 58 training images), so the benchmark needs no download; the backbone has random weights.

Example:
    nice python benchmarks/ddp_epoch_time.py --processes 1 2 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Both with ADFA's default layers, the stride-4/8/16 stages.
BACKBONES = {"lite0": "tf_efficientnet_lite0", "wr50": "wide_resnet50_2"}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=58, help="training images (BrainMRI: 58)")
    parser.add_argument("--batch-size", type=int, default=8, help="per-process batch size")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="lite0")
    parser.add_argument("--image-size", type=int, default=256, help="resize size; the crop is 7/8 of it")
    parser.add_argument("--no-cache", action="store_true", help="disable the training feature cache")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: CPUs / processes)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def _worker(args: argparse.Namespace, devices: int) -> None:
    """Train once with ``devices`` CPU processes; rank 0 writes its timings to ``args.result``."""
    import torch
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

    from anomalib_adfa import Adfa

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.start = 0.0
            self.times: dict[str, float] = {}
            self.hit_rates: dict[str, float] = {}

        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            if trainer.current_epoch == 0:
                self.times["centres"] = time.perf_counter() - self.start
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            self.times[f"epoch {trainer.current_epoch}"] = time.perf_counter() - self.start
            if pl_module.feature_cache is not None:  # read before the module resets the counters
                self.hit_rates[f"epoch {trainer.current_epoch}"] = pl_module.feature_cache.hit_rate

        def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            if trainer.is_global_zero:
                record = {"times": self.times, "hit_rates": self.hit_rates, "threads": torch.get_num_threads()}
                args.result.write_text(json.dumps(record))

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // devices))
    seed_everything(0)
    backbone = BACKBONES[args.backbone]
    crop = args.image_size * 7 // 8
    model = Adfa(
        backbone=backbone,
        pre_trained=False,
        image_size=(args.image_size, args.image_size),
        center_crop_size=(crop, crop),
        cache_features=not args.no_cache,
        visualizer=False,
    )
    datamodule = Folder(
        name="phantom",
        root=args.root,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/lesion",
        train_batch_size=args.batch_size,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    engine = Engine(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=args.epochs,
        limit_val_batches=0,
        callbacks=[EpochTimer()],
        default_root_dir=args.result.parent / f"run{devices}",
        enable_progress_bar=False,
    )
    engine.fit(model, datamodule=datamodule)


def _run(args: argparse.Namespace, devices: int, root: Path, scratch: Path) -> dict[str, Any]:
    """Run one configuration in a subprocess and read back rank 0's timings."""
    result = scratch / f"result{devices}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--root", str(root), "--result", str(result)]
    command += ["--processes", str(devices), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    command += ["--backbone", args.backbone, "--image-size", str(args.image_size)]
    command += ["--no-cache"] if args.no_cache else []
    command += ["--threads", str(args.threads)] if args.threads else []
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{devices}-process run failed:\n{completed.stderr[-4000:]}")
    record = json.loads(result.read_text())
    record["wall"] = time.perf_counter() - start
    return record


def _cell(record: dict[str, Any], phase: str) -> str:
    """Seconds of one phase, with the epoch's cache hit rate in brackets when there is one."""
    hit_rate = record["hit_rates"].get(phase)
    return f"{record['times'][phase]:.2f}" + ("" if hit_rate is None else f" [{hit_rate:.2f}]")


def main() -> None:
    args = _parse()
    if args.worker:
        _worker(args, args.processes[0])
        return
    from anomalib_adfa.synthetic import make_phantom_dataset

    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs")
    print(f"python {platform.python_version()}, load average {os.getloadavg()}")
    print(
        f"backbone {args.backbone} (random weights), {args.images} training images, resize {args.image_size}, "
        f"per-process batch {args.batch_size}, feature cache {'off' if args.no_cache else 'on'}, "
        f"{args.epochs} epochs, no validation"
    )
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "phantom"
        make_phantom_dataset(root, n_train=args.images, n_test_normal=1, n_test_abnormal=1, seed=0)
        records = {devices: _run(args, devices, root, Path(scratch)) for devices in args.processes}
    phases = ["centres"] + [f"epoch {epoch}" for epoch in range(args.epochs)]
    header = ["processes", "threads/process", *(f"{phase} (s)" for phase in phases), "run (s)"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for devices, record in records.items():
        cells = " | ".join(_cell(record, phase) for phase in phases)
        print(f"| {devices} | {record['threads']} | {cells} | {record['wall']:.1f} |")


if __name__ == "__main__":
    main()
