"""Where ``anomalib predict`` with ADFA writes: a new folder in the run the checkpoint came from.

anomalib puts prediction outputs under ``results/<Model>/<dataset>/latest`` of the predict datamodule (not the
training run, and the same folder every time). :func:`prediction_folder` picks, once per prediction run,
``<run>/predictions/<n>`` (the first free ``n``), where ``<run>`` is the run folder of ``--ckpt_path``
(``<run>/weights/lightning/<file>.ckpt``; the checkpoint's own folder for a checkpoint stored elsewhere), or the
trainer's ``default_root_dir`` without a checkpoint. :class:`~anomalib_adfa.callbacks.ScoreCSVWriter` and
:class:`~anomalib_adfa.report.visualization.MedicalImageVisualizer` both write there, so one prediction run never
overwrites another's scores or overlays. Exports of a checkpoint go to its run folder too
(:func:`~anomalib_adfa.deploy.export.export_checkpoint`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

logger = logging.getLogger(__name__)

_CHOSEN = "_adfa_prediction_folder"


def checkpoint_run_folder(ckpt_path: str | Path) -> Path:
    """Return the run folder of a checkpoint: ``<run>`` of ``<run>/weights/lightning/<file>``, else its own folder."""
    path = Path(ckpt_path).resolve()
    if path.parent.name == "lightning" and path.parent.parent.name == "weights":
        return path.parents[2]
    return path.parent


def run_folder(trainer: Trainer) -> Path:
    """Return the run folder of the trainer's checkpoint, or its ``default_root_dir`` without one."""
    checkpoint = getattr(trainer, "ckpt_path", None)
    return checkpoint_run_folder(checkpoint) if checkpoint else Path(trainer.default_root_dir)


def prediction_folder(trainer: Trainer) -> Path:
    """Return this prediction run's output folder, ``<run>/predictions/<n>``, creating it on first use.

    Args:
        trainer: The trainer running ``predict``; the choice is kept on it, so every callback gets the same folder.

    Returns:
        The folder (created).
    """
    chosen = getattr(trainer, _CHOSEN, None)
    if chosen is not None:
        return chosen
    parent = run_folder(trainer) / "predictions"
    number = 0
    while (parent / str(number)).exists():
        number += 1
    chosen = parent / str(number)
    chosen.mkdir(parents=True)
    setattr(trainer, _CHOSEN, chosen)
    logger.info("ADFA prediction outputs go to %s", chosen)
    return chosen
