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

**Where exports go.** anomalib writes an export to ``<export_root>/weights/<type>/`` (``export_root``
defaulting to the trainer's ``default_root_dir``, not the run) and replaces what is there. ADFA's
``to_torch``/``to_onnx``/``to_openvino`` write through :func:`export_to_fresh_folder`: the first export of a
type goes to ``<export_root>/weights/<type>/``, a later one to ``<type>-1``, ``<type>-2``, ... (never over an
earlier export), and the log names the folder. :func:`export_checkpoint` exports a checkpoint into its own run
folder (``<run>/weights/<type>/``) unless the caller names another.

**Checkpoint check.** ``Engine.export(model, ..., ckpt_path=...)`` replaces ``model`` by
``type(model).load_from_checkpoint(ckpt_path)``, which rebuilds the model from the checkpoint's own
hyperparameters: the requested configuration would be ignored silently, both a mismatched architecture and
requested scoring settings. anomalib offers no hook between the two (``load_from_checkpoint`` is a class method
and never sees the requested model). :func:`export_checkpoint` is the explicit ADFA way: it loads the checkpoint
into the *requested* model through the model's ``on_load_checkpoint`` (the same check as ``test``/``predict``,
:func:`~anomalib_adfa.deploy.checkpoint.check_compatibility`) and exports that model. The ``anomalib export`` command
line reaches it through :func:`route_cli_checkpoint_exports`, which only the start-up hook calls, only in the
process of anomalib's command line (:mod:`anomalib_adfa_autoload`); importing or building ADFA changes nothing
of anomalib's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib.utils.serialization import anomalib_safe_globals

from anomalib_adfa.outputs import checkpoint_run_folder

if TYPE_CHECKING:
    from anomalib.engine import Engine

ONNX_OPSET_VERSION = 18
"""ONNX opset of ADFA's ONNX and OpenVINO exports."""

PRECISION_ATTRIBUTE = "precise"
"""IR name of OpenVINO's ``DisablePrecisionConversion`` runtime attribute (version 0)."""

_ROUTED_MARK = "_adfa_checkpoint_exports"

logger = logging.getLogger(__name__)


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


def fresh_export_folder(export_root: str | Path, export_type: str) -> Path:
    """Return ``<export_root>/weights/<export_type>`` if it does not exist, else the first free ``<type>-<n>``."""
    weights = Path(export_root) / "weights"
    folder, number = weights / export_type, 0
    while folder.exists():
        number += 1
        folder = weights / f"{export_type}-{number}"
    return folder


def export_to_fresh_folder(export: Callable[[Path], Path], export_root: str | Path, export_type: str) -> Path:
    """Run one of anomalib's exports in a staging folder, then move its files to a fresh folder of ``export_root``.

    anomalib's ``to_<type>(root)`` writes into ``<root>/weights/<type>/``, replacing what is there. The staging
    folder is made inside ``export_root`` (so the move is a rename) and removed afterwards.

    Args:
        export: anomalib's export of the model, given the root it writes ``weights/<export_type>/`` into.
        export_root: Where the export goes: ``<export_root>/weights/<export_type>`` or, if that exists,
            ``<export_type>-<n>`` (:func:`fresh_export_folder`).
        export_type: ``"torch"``, ``"onnx"`` or ``"openvino"``.

    Returns:
        The path of the exported model file in its final folder.
    """
    root = Path(export_root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".adfa-export-") as staging:
        staged = Path(staging) / "weights" / export_type
        written = Path(export(Path(staging)))
        target = fresh_export_folder(root, export_type)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(target)
    if target.name != export_type:
        logger.info("%s already holds an export; this one goes to %s", target.with_name(export_type), target)
    return target / written.relative_to(staged)


class AdfaExport:
    """ADFA's ``to_torch``/``to_onnx``/``to_openvino``: anomalib's, into a fresh folder, opset 18, float32 IR.

    Mixed into :class:`~anomalib_adfa.Adfa` before :class:`~anomalib.models.components.AnomalibModule`, whose
    export methods ``super()`` reaches.
    """

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Export as anomalib does, into a fresh folder (:func:`export_to_fresh_folder`)."""
        return export_to_fresh_folder(
            lambda root: super(AdfaExport, self).to_torch(root, model_file_name), export_root, "torch"
        )

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX as anomalib does, with opset :data:`ONNX_OPSET_VERSION` unless ``opset_version`` is given.

        ``to_openvino`` converts through this method, so it gets the same default. The exporter's per-pass INFO
        logging is silenced (:func:`quiet_onnx_passes`). The file goes to a fresh folder
        (:func:`export_to_fresh_folder`).
        """
        kwargs.setdefault("opset_version", ONNX_OPSET_VERSION)
        with quiet_onnx_passes():
            return export_to_fresh_folder(
                lambda root: super(AdfaExport, self).to_onnx(root, model_file_name, input_size, **kwargs),
                export_root,
                "onnx",
            )

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        ov_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to OpenVINO IR as anomalib does, pinned to float32 inference unless asked otherwise.

        OpenVINO's CPU plugin computes in bfloat16 by default on CPUs that support it, which moves ADFA's
        normalised scores by about 1e-2 and can flip labels near the threshold. The IR is therefore written
        with every operation marked to keep its float32 precision (see :func:`keep_float32_inference`).
        ``ov_kwargs={"inference_precision": "bf16"}`` (or ``"f16"``; CLI: ``--ov_kwargs '{"inference_precision":
        "bf16"}'``) leaves the IR unmarked, so the runtime's default precision applies; the remaining ``ov_kwargs``
        go to ``openvino.convert_model``. The files go to a fresh folder (:func:`export_to_fresh_folder`).

        Returns:
            Path of the ``.xml`` file.
        """
        ov_kwargs = dict(ov_kwargs or {})
        precision = ov_kwargs.pop("inference_precision", "f32")
        if precision not in {"f32", "bf16", "f16"}:
            msg = f"inference_precision must be 'f32', 'bf16' or 'f16', got {precision!r}"
            raise ValueError(msg)
        xml_path = export_to_fresh_folder(
            lambda root: super(AdfaExport, self).to_openvino(
                root, model_file_name, input_size, ov_kwargs=ov_kwargs, **kwargs
            ),
            export_root,
            "openvino",
        )
        if precision == "f32":
            keep_float32_inference(xml_path)
        return xml_path


def export_checkpoint(
    engine: Engine,
    model: Any,
    export_type: str,
    ckpt_path: str | Path,
    export_root: str | Path | None = None,
    **kwargs: Any,
) -> Path | None:
    """Export an ADFA checkpoint as the requested ``model``, into the checkpoint's run folder by default.

    The explicit form of ``engine.export(model, export_type, ckpt_path=...)`` for ADFA (see the module docstring).

    Args:
        engine: The engine that exports.
        model: An ADFA model built from the requested configuration; the checkpoint is loaded into it.
        export_type: ``"torch"``, ``"onnx"`` or ``"openvino"``.
        ckpt_path: Lightning checkpoint.
        export_root: Folder to export into; ``None``: the checkpoint's run folder
            (:func:`~anomalib_adfa.outputs.checkpoint_run_folder`).
        **kwargs: The other arguments of ``Engine.export``.

    Returns:
        The path of the exported model file.

    Raises:
        IncompatibleCheckpointError: If the checkpoint was trained with another configuration.
    """
    load_checkpoint_into(model, ckpt_path)
    if export_root is None:
        export_root = checkpoint_run_folder(ckpt_path)
    return engine.export(model, export_type, export_root=export_root, **kwargs)


def route_cli_checkpoint_exports() -> None:
    """Send ``anomalib export --model Adfa ... --ckpt_path ...`` through :func:`export_checkpoint`.

    anomalib's command line calls ``Engine.export`` itself, so this wraps that method, and only for ADFA models
    with a checkpoint; every other call goes to anomalib's method untouched. Called by the start-up hook in the
    process of anomalib's command line only (:mod:`anomalib_adfa_autoload`), never at import or construction.
    Idempotent.
    """
    from anomalib.engine import Engine

    export = Engine.export
    if getattr(export, _ROUTED_MARK, False):
        return
    signature = inspect.signature(export)

    @functools.wraps(export)
    def export_adfa_checkpoints(*args: Any, **kwargs: Any) -> Path | None:
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        if isinstance(arguments.get("model"), AdfaExport) and arguments.get("ckpt_path"):
            return export_checkpoint(arguments.pop("self"), **arguments)
        return export(*args, **kwargs)

    setattr(export_adfa_checkpoints, _ROUTED_MARK, True)
    Engine.export = export_adfa_checkpoints  # type: ignore[method-assign]
