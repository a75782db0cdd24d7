"""Make anomalib's export of an ADFA checkpoint honour the requested configuration.

``Engine.export(model, ..., ckpt_path=...)`` (and so ``anomalib export --model Adfa ... --ckpt_path``)
replaces ``model`` by ``type(model).load_from_checkpoint(ckpt_path)``, which rebuilds the model from
the checkpoint's own hyperparameters. A checkpoint trained with another architecture than the one
requested (say ``--model.gamma_d 8`` for a ``gamma_d=4`` checkpoint) would therefore be exported
silently, while ``anomalib predict`` and ``Engine.test`` refuse it in
:meth:`~anomalib_adfa.lightning_model.Adfa.on_load_checkpoint`. :func:`install_export_guard` wraps
``Engine.export`` once so that, for ADFA models only, the same check runs before anything is
exported; every other model goes through the original method untouched. ``Adfa.__init__`` installs
the guard (an ADFA model exists before anything can export it), not the package import: importing
``anomalib.engine`` from the plugin while anomalib itself is still importing would be circular.

The exported graph itself needs no help: anomalib exports the whole module (pre-processor, ADFA,
post-processor) with ``torch.onnx.export(dynamo=True)``, opset
:data:`~anomalib_adfa.lightning_model.ONNX_OPSET_VERSION` by default for ADFA.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from anomalib.utils.serialization import anomalib_safe_globals

_GUARD_MARK = "_adfa_export_guard"


def check_checkpoint_for_export(model: Any, ckpt_path: str | Path) -> None:
    """Raise if ``ckpt_path`` was trained with another architecture than the ADFA ``model``.

    Args:
        model: The ADFA model built from the requested configuration.
        ckpt_path: Lightning checkpoint to export.

    Raises:
        FileNotFoundError: If ``ckpt_path`` is not a file.
        IncompatibleCheckpointError: If an architecture hyperparameter differs (the message names each one).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        msg = f"ADFA checkpoint to export not found: {path}"
        raise FileNotFoundError(msg)
    with anomalib_safe_globals(extra=type(model).checkpoint_safe_globals()):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.check_checkpoint_compatibility(checkpoint)


def _guard(export: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(export)

    @functools.wraps(export)
    def guarded_export(*args: Any, **kwargs: Any) -> Any:
        from anomalib_adfa.lightning_model import Adfa

        call = signature.bind(*args, **kwargs)
        model, ckpt_path = call.arguments.get("model"), call.arguments.get("ckpt_path")
        if isinstance(model, Adfa) and ckpt_path:
            check_checkpoint_for_export(model, ckpt_path)
        return export(*args, **kwargs)

    setattr(guarded_export, _GUARD_MARK, True)
    return guarded_export


def install_export_guard() -> None:
    """Wrap ``anomalib.engine.Engine.export`` with the ADFA checkpoint check (idempotent)."""
    from anomalib.engine import Engine

    if not getattr(Engine.export, _GUARD_MARK, False):
        Engine.export = _guard(Engine.export)  # type: ignore[method-assign]
