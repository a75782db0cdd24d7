"""Score images with an exported model (OpenVINO ``.xml`` or ONNX ``.onnx``), without the training stack.

``anomalib-adfa predict model.xml scans/ more.dcm`` (or ``python -m anomalib_adfa.deploy.predict ...``) reads every
DICOM, PNG, JPEG, BMP or TIFF file given (folders are searched recursively) with the project's one reader
(:func:`~anomalib_adfa.data.image.read_image_array`: DICOM windowing, 16-bit images), runs the exported graph
and writes ``<output>/scores.csv`` (``image_path, pred_score, pred_label``) and one heatmap overlay per image
under ``<output>/overlays``. It imports neither Lightning nor anomalib: only numpy, PIL, matplotlib,
pydicom (for DICOM) and the runtime (``onnxruntime`` or ``openvino``, from the ``export`` extra).

anomalib's export puts the pre-processor (resize, normalisation) and the post-processor (score
normalisation, thresholds) inside the graph; its input is a float32 ``(1, 3, H, W)`` RGB batch in [0, 1] at
any ``H x W``. So ``pred_label`` is the label at the threshold stored in the model, ``pred_score`` and the
anomaly map are normalised so that the threshold is at 0.5, and this module does no arithmetic on them.

No DICOM header field is written anywhere: the CSV holds the path you gave, the scores and labels; the
overlays are plain PNGs (pixels only, no text chunks).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalib_adfa.data.dicom import ReadOptions
from anomalib_adfa.data.layout import find_image_files
from anomalib_adfa.errors import ConfigurationError

CSV_COLUMNS = ("image_path", "pred_score", "pred_label")
EXPORT_EXTRA = 'pip install "anomalib-adfa[export]"'
# OpenVINO's CPU plugin computes in bfloat16 on CPUs that support it, and its GPU plugin in float16, unless told
# otherwise; every device is asked for float32, and one that refuses is an error.
_OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}
_OVERLAY_ALPHA = 0.45


class ExportedModel:
    """An exported anomalib graph run by OpenVINO (``.xml``) or onnxruntime (``.onnx``).

    Args:
        path: The exported model file.
        device: OpenVINO device (``"CPU"``, ``"GPU"``...); onnxruntime always uses its CPU provider here.

    Raises:
        ValueError: When the file is missing, has another extension, or the graph lacks ``pred_score``.
        ImportError: When the runtime is not installed (the message names the extra).
    """

    def __init__(self, path: str | Path, device: str = "CPU") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            msg = f"exported model '{self.path}' does not exist"
            raise ValueError(msg)
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            self._run = self._onnx(device)
        elif suffix == ".xml":
            self._run = self._openvino(device)
        else:
            msg = f"'{self.path}': expected an OpenVINO .xml or an ONNX .onnx file from anomalib's export"
            raise ValueError(msg)
        if "pred_score" not in self.output_names:
            msg = f"'{self.path}' has outputs {sorted(self.output_names)}, not anomalib's pred_score"
            raise ValueError(msg)

    def _onnx(self, device: str) -> Any:
        del device
        try:
            import onnxruntime
        except ImportError as error:
            msg = f"running ONNX models needs onnxruntime: {EXPORT_EXTRA}"
            raise ImportError(msg) from error
        session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        (graph_input,) = session.get_inputs()
        self.output_names = [output.name for output in session.get_outputs()]

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(self.output_names, session.run(None, {graph_input.name: batch}), strict=True))

        return run

    def _openvino(self, device: str) -> Any:
        try:
            import openvino
        except ImportError as error:
            msg = f"running OpenVINO models needs openvino: {EXPORT_EXTRA}"
            raise ImportError(msg) from error
        try:
            compiled = openvino.Core().compile_model(str(self.path), device, _OPENVINO_F32)
        except RuntimeError as error:
            lines = str(error).strip().splitlines()
            msg = (
                f"OpenVINO cannot run '{self.path}' on device {device!r} in float32 ({lines[-1] if lines else error}); "
                "ADFA's thresholds hold for float32 scores: use --device CPU"
            )
            raise ValueError(msg) from error
        try:
            precision = compiled.get_property("INFERENCE_PRECISION_HINT")
        except RuntimeError:  # AUTO and MULTI do not report it; they pass the request on to the device they pick
            precision = None
        if precision is not None and precision != openvino.Type.f32:
            msg = f"OpenVINO device {device!r} runs '{self.path}' in {precision}, not float32: use --device CPU"
            raise ValueError(msg)
        self.output_names = [next(iter(port.names)) for port in compiled.outputs]

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            return {next(iter(port.names)): value for port, value in compiled(batch).items()}

        return run

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on one image.

        Args:
            image: float32 ``(H, W, 3)`` in [0, 1], as :func:`~anomalib_adfa.data.image.read_image_array` gives.

        Returns:
            The graph's outputs by name (``pred_score``, ``pred_label``, ``anomaly_map``...), batch of one.
        """
        batch = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
        return self._run(batch)


@dataclass(frozen=True)
class Prediction:
    """One scored image: its path, normalised score, label at the stored threshold, and anomaly map ``(h, w)``."""

    path: Path
    score: float
    label: int | None
    anomaly_map: np.ndarray | None


def overlay(image: np.ndarray, anomaly_map: np.ndarray) -> np.ndarray:
    """Blend a normalised anomaly map (0.5 = threshold) over the image with the ``jet`` colour map.

    Args:
        image: float ``(H, W, 3)`` in [0, 1].
        anomaly_map: ``(h, w)`` normalised map, resized bilinearly to ``H x W``; colours span [0, 1].

    Returns:
        uint8 ``(H, 2 W, 3)``: the image beside the blend.
    """
    from matplotlib import colormaps

    height, width = image.shape[:2]
    heat = np.asarray(
        Image.fromarray(anomaly_map.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    )
    colours = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]
    blended = (1 - _OVERLAY_ALPHA) * image + _OVERLAY_ALPHA * colours
    return np.round(np.concatenate([image, blended], axis=1) * 255).astype(np.uint8)


def predict(
    model: ExportedModel,
    images: Sequence[Path],
    options: ReadOptions | None = None,
    overlay_dir: Path | None = None,
) -> list[Prediction]:
    """Score images one by one (each at its own size); write overlays when ``overlay_dir`` is given.

    Every file is read-checked first, and all unreadable ones are reported at once
    (:class:`~anomalib_adfa.data.errors.CorruptImageError`); DICOM options with no DICOM file are refused.
    """
    # The reader imports torch (its tensors); importing it here keeps ``anomalib-adfa --help`` instant.
    from anomalib_adfa.data.image import check_options_apply, check_readable, read_image_array

    check_options_apply(images, options)
    check_readable(images, options)
    predictions = []
    names: dict[str, int] = {}
    for path in images:
        image = read_image_array(path, options)
        outputs = model(image)
        anomaly_map = outputs.get("anomaly_map")
        anomaly_map = None if anomaly_map is None else anomaly_map.reshape(anomaly_map.shape[-2:])
        label = outputs.get("pred_label")
        prediction = Prediction(
            path=path,
            score=float(outputs["pred_score"].reshape(-1)[0]),
            label=None if label is None else int(label.reshape(-1)[0]),
            anomaly_map=anomaly_map,
        )
        predictions.append(prediction)
        if overlay_dir is not None and anomaly_map is not None:
            overlay_dir.mkdir(parents=True, exist_ok=True)
            count = names.get(path.name, 0)  # same file name in two folders: number the later ones
            names[path.name] = count + 1
            name = f"{path.name}.png" if count == 0 else f"{path.name}.{count}.png"
            Image.fromarray(overlay(image, anomaly_map)).save(overlay_dir / name)
    return predictions


def write_scores(predictions: Sequence[Prediction], path: Path) -> None:
    """Write ``image_path, pred_score, pred_label`` rows (the label is empty when the graph has none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows((str(p.path), p.score, "" if p.label is None else p.label) for p in predictions)


def _window(value: str) -> int | str:
    return value if value == "full" else int(value)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the predictor's arguments to ``parser`` (used by ``anomalib-adfa predict`` and ``-m``)."""
    parser.add_argument("model", type=Path, help="exported model: OpenVINO .xml or ONNX .onnx")
    parser.add_argument("inputs", type=Path, nargs="+", help="image files and folders (searched recursively)")
    parser.add_argument("--output", type=Path, default=Path("adfa_predictions"), help="output folder")
    parser.add_argument("--device", default="CPU", help="OpenVINO device")
    parser.add_argument("--no-overlays", action="store_true", help="write the score CSV only")
    dicom = parser.add_argument_group("DICOM")
    dicom.add_argument("--window", type=_window, default=0, help="VOI LUT / window index in the file, or 'full'")
    dicom.add_argument("--window-center", type=float, help="window centre to use instead of the file's")
    dicom.add_argument("--window-width", type=float, help="window width to use instead of the file's")
    dicom.add_argument("--frame", type=int, help="frame of multi-frame files (refused without one)")
    return parser


def _run(args: argparse.Namespace) -> int:
    options = ReadOptions(
        window=args.window, window_center=args.window_center, window_width=args.window_width, frame=args.frame
    )
    scores = args.output / "scores.csv"
    if scores.exists():
        msg = f"--output {args.output} already holds scores.csv; give a new folder (nothing is overwritten)"
        raise ConfigurationError(msg)
    model = ExportedModel(args.model, device=args.device)
    images = find_image_files(args.inputs)
    overlay_dir = None if args.no_overlays else args.output / "overlays"
    predictions = predict(model, images, options, overlay_dir)
    write_scores(predictions, scores)
    for prediction in predictions:
        print(f"{prediction.path}: score={prediction.score:.4f} label={prediction.label}")
    overlays = "" if overlay_dir is None else f", overlays in {overlay_dir}"
    print(f"{len(predictions)} image(s) scored; scores in {scores}{overlays}")
    return 0


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run a parsed ``predict`` command: one line per image, then where the CSV and overlays are.

    Bad input (a missing or unreadable file, a wrong model file, a missing runtime) ends the process
    through ``parser.exit`` with the error's message, not a traceback.
    """
    try:
        return _run(args)
    except (ValueError, ImportError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}{os.linesep}")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m anomalib_adfa.deploy.predict MODEL INPUT...``; see the module docstring."""
    parser = argparse.ArgumentParser(prog="anomalib-adfa predict", description=__doc__.split("\n\n")[0])
    return run(parser, add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
