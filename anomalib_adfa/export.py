"""What ADFA adds to anomalib's export: the ONNX opset, float32 OpenVINO inference, and the checkpoint check.

**Opset.** anomalib exports the whole module (pre-processor, ADFA, post-processor) with
``torch.onnx.export(dynamo=True)``; its default opset (14) makes the dynamo exporter fail noisily while
converting down from 18 (no adapter for ``Pad``), after which it keeps 18 anyway, so ADFA asks for
:data:`ONNX_OPSET_VERSION` directly.

**Float32 OpenVINO inference.** OpenVINO's CPU plugin runs models in bfloat16 on CPUs that support it
unless the caller passes ``INFERENCE_PRECISION_HINT=f32`` to ``compile_model``, which anomalib's
``OpenVINOInferencer``, ``anomalib predict`` and OpenVINO Model Server do not. For ADFA that moves
normalised image scores by about 2e-2 and flips labels near the threshold. OpenVINO 2026.4 does not read
an inference precision from the model's ``rt_info`` (its ``runtime_options`` section is honoured only for
a few LLM keys such as ``KV_CACHE_PRECISION``; measured, see ``tests/test_export.py``), but its plugins
keep the original precision of operations that carry the ``precise`` runtime attribute
(``DisablePrecisionConversion``). :func:`keep_float32_inference` marks every operation of the IR with it.
The Python API cannot create that attribute, so the IR's XML is edited, which is its documented
serialisation. Operations that the CPU plugin creates itself while compiling (decompositions, fused
eltwise subgraphs) do not inherit the mark, so on a bfloat16 CPU a small part of the graph still runs in
bfloat16: the residual is measured by ``tests/test_export.py`` (forcing bfloat16) and stated in the README.

**Checkpoint check.** ``Engine.export(model, ..., ckpt_path=...)`` (and so ``anomalib export --model Adfa
... --ckpt_path``) replaces ``model`` by ``type(model).load_from_checkpoint(ckpt_path)``, which rebuilds
the model from the checkpoint's own hyperparameters: the requested configuration would be ignored
silently, both a mismatched architecture and requested scoring settings. anomalib offers no hook between
the two (``load_from_checkpoint`` is a class method and never sees the requested model), so
:func:`install_export_guard` wraps ``Engine.export`` once. For models of the class it was installed for
(ADFA) it loads the checkpoint into the *requested* model through the model's ``on_load_checkpoint``,
the same check as ``test``/``predict`` (:func:`~anomalib_adfa.checkpoint.check_compatibility`), and
exports that model; every other model goes through anomalib's method untouched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from anomalib.utils.serialization import anomalib_safe_globals

ONNX_OPSET_VERSION = 18
"""ONNX opset of ADFA's ONNX and OpenVINO exports."""

PRECISION_ATTRIBUTE = "precise"
"""IR name of OpenVINO's ``DisablePrecisionConversion`` runtime attribute (version 0)."""

_GUARD_MARK = "_adfa_export_guard"


def keep_float32_inference(xml_path: str | Path) -> None:
    """Mark every operation of an OpenVINO IR to keep its float32 precision whatever the runtime's default.

    Args:
        xml_path: The IR's ``.xml`` file, rewritten in place (the ``.bin`` file is unchanged).
    """
    tree = ET.parse(xml_path)
    for layer in tree.getroot().iter("layer"):
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ET.SubElement(layer, "rt_info")
        if not any(attribute.get("name") == PRECISION_ATTRIBUTE for attribute in rt_info.iter("attribute")):
            ET.SubElement(rt_info, "attribute", {"name": PRECISION_ATTRIBUTE, "version": "0"})
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)


ONNX_PASS_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")
"""Loggers of the ONNX exporter's graph passes: at INFO (anomalib's CLI level) they log each pass, ~1,900 lines."""


@contextlib.contextmanager
def quiet_onnx_passes() -> Iterator[None]:
    """Log the ONNX exporter's graph passes at WARNING and above while the block runs (their INFO is per-node)."""
    loggers = [logging.getLogger(name) for name in ONNX_PASS_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def load_checkpoint_into(model: Any, ckpt_path: str | Path) -> None:
    """Load a Lightning checkpoint into ``model`` through its ``on_load_checkpoint`` hook.

    Args:
        model: An ADFA model built from the requested configuration.
        ckpt_path: Lightning checkpoint.

    Raises:
        FileNotFoundError: If ``ckpt_path`` is not a file.
        IncompatibleCheckpointError: If the checkpoint was trained with another configuration.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        msg = f"ADFA checkpoint not found: {path}"
        raise FileNotFoundError(msg)
    with anomalib_safe_globals(extra=type(model).checkpoint_safe_globals()):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])


def _guard(export: Callable[..., Any], model_class: type) -> Callable[..., Any]:
    signature = inspect.signature(export)

    @functools.wraps(export)
    def guarded_export(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        model, ckpt_path = call.arguments.get("model"), call.arguments.get("ckpt_path")
        if isinstance(model, model_class) and ckpt_path:
            load_checkpoint_into(model, ckpt_path)
            call.arguments["ckpt_path"] = None
        return export(*call.args, **call.kwargs)

    setattr(guarded_export, _GUARD_MARK, True)
    return guarded_export


def install_export_guard(model_class: type) -> None:
    """Wrap ``anomalib.engine.Engine.export`` so that checkpoints of ``model_class`` load into the requested model.

    Idempotent. Called from ``Adfa.__init__`` (an ADFA model exists before anything can export it), not at
    package import: importing ``anomalib.engine`` while anomalib itself is still importing would be circular.

    Args:
        model_class: The model class (ADFA) whose exports are guarded.
    """
    from anomalib.engine import Engine

    if not getattr(Engine.export, _GUARD_MARK, False):
        Engine.export = _guard(Engine.export, model_class)  # type: ignore[method-assign]
