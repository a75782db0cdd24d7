"""Lightning callbacks for running ADFA with anomalib.

anomalib's ``predict`` saves heatmap overlays (its ``ImageVisualizer``, under ``<run>/images``) but
no table of scores. :class:`ScoreCSVWriter` adds ``<run>/scores.csv``, for ``Engine.predict`` and for
the CLI, where it is appended to the trainer's callbacks (the model options must match the
checkpoint's architecture)::

    anomalib predict --model Adfa <the training's --model options> --ckpt_path model.ckpt
        --data path/to/images --trainer.callbacks+=anomalib_adfa.callbacks.ScoreCSVWriter
        [--trainer.callbacks.csv_path my_scores.csv]
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from anomalib.data import Batch
from lightning.pytorch import Callback, LightningModule, Trainer

CSV_COLUMNS = ("image_path", "pred_score", "pred_label")


class ScoreCSVWriter(Callback):
    """Write one CSV row per predicted image: its path, normalised score and predicted label.

    anomalib's post-processor (a model callback, so it runs after trainer callbacks) normalises and
    thresholds each prediction batch in place at ``on_predict_batch_end``. The writer therefore
    reads a batch only once the next batch starts, or prediction ends, when the post-processor has
    run on it; it keeps one batch and the rows, not the images of the whole run.

    Args:
        csv_path: Output file; relative paths and the default ``scores.csv`` are taken relative to the
            trainer's ``default_root_dir`` (where the visualiser writes its images). With several
            processes each rank writes its own share to ``<stem>.rank<r>.csv``.
    """

    def __init__(self, csv_path: str | Path = "scores.csv") -> None:
        super().__init__()
        self.csv_path = Path(csv_path)
        self._pending: Batch | None = None
        self._rows: list[tuple[str, float, int | str]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._pending = None
        self._rows = []

    def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs
        self._collect_pending()

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any) -> None:
        del trainer, pl_module, args
        self._pending = outputs

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        self._collect_pending()
        path = self.csv_path if self.csv_path.is_absolute() else Path(trainer.default_root_dir) / self.csv_path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(self._rows)
        self._rows = []

    def _collect_pending(self) -> None:
        """Turn the held batch into rows (``pred_label`` is empty when thresholding is disabled)."""
        batch, self._pending = self._pending, None
        if batch is None:
            return
        scores = batch.pred_score.detach().float().reshape(-1).cpu().tolist()
        labels = (
            batch.pred_label.reshape(-1).int().cpu().tolist() if batch.pred_label is not None else [""] * len(scores)
        )
        paths = batch.image_path if batch.image_path is not None else [""] * len(scores)
        self._rows.extend(zip((str(p) for p in paths), scores, labels, strict=True))
