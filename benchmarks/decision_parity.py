"""Same image, same decision: one trained model's score and label on every path an image can take.

Trains ADFA (EfficientNet-Lite0 ImageNet weights, resize 146, crop 128, 2 epochs, label-free ``from_train``
thresholds) on the real BrainMRI images, exports it to ONNX and OpenVINO, and scores the test images *at their
original sizes* through:

- ``checkpoint_b1`` / ``checkpoint_b8``: ``Engine.predict`` on ``MedicalFolder(predict_dir=...)`` at batch 1 and
  batch 8 (mixed sizes in a batch): the reference is ``checkpoint_b1``;
- ``anomalib_folder``: ``Engine.predict(data_path=...)`` (anomalib's ``PredictDataset``, PIL reader);
- ``torch_inferencer``: anomalib's ``TorchInferencer`` on the torch export;
- ``onnxruntime``: an ONNX Runtime session on anomalib's ``read_image``;
- ``openvino_default``: anomalib's ``OpenVINOInferencer`` with its defaults (this CPU's default precision);
- ``openvino_bf16``: the same IR compiled with ``INFERENCE_PRECISION_HINT=bf16`` (any CPU);
- ``adfa_predict_openvino`` / ``adfa_predict_onnx``: ``anomalib-adfa predict``'s code path.

It prints, per path, the number of label flips against ``checkpoint_b1`` and the largest absolute difference of
the normalised score (threshold 0.5). Run: ``python -m benchmarks.decision_parity [--data-root ../shared/data]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import openvino as ov
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from anomalib.engine import Engine

from anomalib_adfa import Adfa
from anomalib_adfa.data import BrainMRI, MedicalFolder
from anomalib_adfa.deploy.predict import ExportedModel, predict
from anomalib_adfa.weights import efficientnet_lite0_weights
from benchmarks.machine import cpu_model


def _engine(root: Path, **kwargs: object) -> Engine:
    return Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root, **kwargs)


def _checkpoint_scores(model: Adfa, folder: Path, work: Path, batch_size: int) -> dict[str, tuple[float, int]]:
    datamodule = MedicalFolder(predict_dir=folder, eval_batch_size=batch_size, num_workers=0)
    batches = _engine(work).predict(model, datamodule=datamodule)
    return {
        Path(path).name: (float(score), int(label))
        for batch in batches
        for path, score, label in zip(batch.image_path, batch.pred_score, batch.pred_label, strict=True)
    }


def _anomalib_folder_scores(model: Adfa, folder: Path, work: Path) -> dict[str, tuple[float, int]]:
    batches = _engine(work).predict(model, data_path=folder)
    return {
        Path(path).name: (float(score), int(label))
        for batch in batches
        for path, score, label in zip(batch.image_path, batch.pred_score, batch.pred_label, strict=True)
    }


def _inferencer_scores(inferencer: object, paths: list[Path]) -> dict[str, tuple[float, int]]:
    scores = {}
    for path in paths:
        prediction = inferencer.predict(str(path))
        scores[path.name] = (float(prediction.pred_score.item()), int(prediction.pred_label.item()))
    return scores


def _compiled_scores(xml_path: Path, paths: list[Path], config: dict[str, str]) -> dict[str, tuple[float, int]]:
    compiled = ov.Core().compile_model(str(xml_path), "CPU", config)
    scores = {}
    for path in paths:
        image = read_image(path, as_tensor=True).unsqueeze(0).numpy()
        outputs = {next(iter(port.names)): value for port, value in compiled(image).items()}
        scores[path.name] = (float(outputs["pred_score"].item()), int(outputs["pred_label"].item()))
    return scores


def _onnx_scores(onnx_path: Path, paths: list[Path]) -> dict[str, tuple[float, int]]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    scores = {}
    for path in paths:
        image = read_image(path, as_tensor=True).unsqueeze(0).numpy()
        outputs = dict(zip(names, session.run(None, {"input": image}), strict=True))
        scores[path.name] = (float(outputs["pred_score"].item()), int(outputs["pred_label"].item()))
    return scores


def _adfa_predict_scores(path: Path, images: list[Path]) -> dict[str, tuple[float, int]]:
    return {p.path.name: (p.score, int(p.label)) for p in predict(ExportedModel(path), images)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1024)
    parser.add_argument("--work", type=Path, help="folder for the model and exports, reused when it holds them")
    args = parser.parse_args(argv)
    brainmri = args.data_root / "brain_tumor_dataset"
    if not brainmri.is_dir():
        parser.error(f"{brainmri} is missing: pass --data-root with the real BrainMRI images")
    torch.manual_seed(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="decision_parity_"))
    checkpoint = work / "model.ckpt"
    datamodule = BrainMRI(root=brainmri, seed=args.seed, train_batch_size=10, eval_batch_size=32)
    if checkpoint.is_file():
        model = Adfa.load_from_checkpoint(checkpoint)
    else:
        model = Adfa(
            backbone="tf_efficientnet_lite0",
            backbone_weights=efficientnet_lite0_weights(),
            image_size=(146, 146),
            center_crop_size=(128, 128),
        )
        engine = _engine(work / "fit", max_epochs=args.epochs)
        engine.fit(model, datamodule=datamodule)
        engine.trainer.save_checkpoint(checkpoint)
    model.eval()
    datamodule.setup("test")
    paths = [Path(path) for path in datamodule.test_data.samples.image_path]
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    for path in paths:
        shutil.copy(path, folder / path.name)
    paths = sorted(folder.iterdir())
    sizes = {read_image(path, as_tensor=True).shape[-2:] for path in paths}

    engine = _engine(work / "export")
    onnx_path, xml_path, torch_path = (
        next((work / kind).rglob(name), None) or engine.export(model, kind, export_root=work / kind)
        for kind, name in (("onnx", "model.onnx"), ("openvino", "model.xml"), ("torch", "model.pt"))
    )
    os.environ.setdefault("TRUST_REMOTE_CODE", "1")  # anomalib's TorchInferencer unpickles; we wrote this file
    default_precision = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")

    results = {
        "checkpoint_b1": _checkpoint_scores(model, folder, work / "b1", 1),
        "checkpoint_b8": _checkpoint_scores(model, folder, work / "b8", 8),
        "anomalib_folder": _anomalib_folder_scores(model, folder, work / "folder"),
        "torch_inferencer": _inferencer_scores(TorchInferencer(torch_path, device="cpu"), paths),
        "onnxruntime": _onnx_scores(onnx_path, paths),
        f"openvino_default ({default_precision})": _inferencer_scores(OpenVINOInferencer(xml_path), paths),
        "openvino_bf16": _compiled_scores(xml_path, paths, {"INFERENCE_PRECISION_HINT": "bf16"}),
        "adfa_predict_openvino": _adfa_predict_scores(xml_path, paths),
        "adfa_predict_onnx": _adfa_predict_scores(onnx_path, paths),
    }
    reference = results["checkpoint_b1"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    print(
        f"{len(paths)} BrainMRI test images at {len(sizes)} original sizes; CPU {cpu_model()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, OpenVINO {ov.__version__}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit.stdout.strip()}"
    )
    threshold_labels = sum(label for _, label in reference.values())
    margin = min(abs(score - 0.5) for score, _ in reference.values())
    print(
        f"reference checkpoint_b1: {threshold_labels} of {len(reference)} images above the threshold; the closest "
        f"score is {margin:.3f} from it"
    )
    print("| path | label flips | max abs. score difference (normalised) |")
    print("|---|---|---|")
    for name, scores in results.items():
        flips = sorted(key for key, (_, label) in scores.items() if label != reference[key][1])
        worst = max(abs(score - reference[key][0]) for key, (score, _) in scores.items())
        shown = f"{len(flips)} ({', '.join(flips[:4])})" if flips else "0"
        print(f"| {name} | {shown} | {worst:.2e} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
