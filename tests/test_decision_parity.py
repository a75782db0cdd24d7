"""One image, one decision: the checkpoint's label at batch 1 on every path an image at its original size can take.

A tiny model (Lite0, random weights, 72 -> 64 px, 1 epoch) is trained on real BrainMRI normals, or on phantoms where
``../shared/data`` is absent. The images it then scores keep their original, mixed sizes (BrainMRI's own, BUSI's
450-600 px; the phantoms are rescaled to several sizes), so every path has to resize them itself:

- checkpoint: ``Engine.predict`` on ``MedicalFolder(predict_dir=...)`` at batch 1 (the reference) and at batch 8
  (mixed sizes in one batch), and on a bare folder (anomalib's ``PredictDataset``);
- exported: anomalib's ``TorchInferencer``, ONNX Runtime, anomalib's ``OpenVINOInferencer`` with its defaults, the
  same IR forced to bfloat16, and ``anomalib-adfa predict``'s reader and runtimes.

float32 paths must give every image the reference label and a normalised score within 1e-3. bfloat16 keeps about
three significant digits: its scores must lie within the ``bfloat16_bound`` fixture of the reference and every image
farther than that from the threshold keeps its label.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnxruntime as ort
import openvino as ov
import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from anomalib.engine import Engine
from PIL import Image

from anomalib_adfa import Adfa
from anomalib_adfa.data import MedicalFolder
from anomalib_adfa.deploy.predict import ExportedModel, predict
from anomalib_adfa.synthetic import ABNORMAL_DIR, NORMAL_DIR, NORMAL_TEST_DIR, make_phantom_dataset

pytestmark = pytest.mark.slow

SMALL = {
    "backbone": "tf_efficientnet_lite0",
    "layers": ("blocks.1", "blocks.2", "blocks.4"),
    "pre_trained": False,
    "image_size": (72, 72),
    "center_crop_size": (64, 64),
}
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
F32_SCORE_TOLERANCE = 1e-3

Scores = dict[str, tuple[float, int]]


def _engine(root: Path, **kwargs: object) -> Engine:
    return Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root, **kwargs)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(training normals, images to score)``: real images at their own sizes, else resized phantoms.

    ``abnormal/`` beside the training normals holds four abnormal images, which ``MedicalFolder`` needs for its
    test split (not used here).
    """
    root = tmp_path_factory.mktemp("parity")
    train, score, abnormal = root / "train", root / "score", root / "abnormal"
    for folder in (train, score, abnormal):
        folder.mkdir()
    brainmri = SHARED_DATA / "brain_tumor_dataset"
    busi = SHARED_DATA / "busi_sample" / "Dataset_BUSI_with_GT"
    if brainmri.is_dir() and busi.is_dir():
        normals = sorted((brainmri / "no").iterdir())
        for path in normals[:16]:
            shutil.copy(path, train / path.name)
        tumours = sorted((brainmri / "yes").iterdir())
        for path in tumours[-4:]:
            shutil.copy(path, abnormal / path.name)
        picked = [*normals[-8:], *tumours[:12]]
        picked += [path for path in sorted(busi.rglob("*.png")) if "_mask" not in path.name][::3]
        for path in picked:
            shutil.copy(path, score / f"{path.parent.name}_{path.name}")
        return train, score
    phantoms = make_phantom_dataset(root / "phantom", n_train=12, n_test_normal=6, n_test_abnormal=6, image_size=64)
    for path in sorted((phantoms.root / NORMAL_DIR).iterdir()):
        shutil.copy(path, train / path.name)
    sizes = [(90, 70), (64, 64), (130, 150), (101, 77), (200, 180), (48, 60)]
    lesions = sorted((phantoms.root / ABNORMAL_DIR).iterdir())
    for path in lesions[:4]:
        shutil.copy(path, abnormal / path.name)
    tests = sorted((phantoms.root / NORMAL_TEST_DIR).iterdir()) + lesions
    for index, path in enumerate(tests):
        with Image.open(path) as image:
            image.resize(sizes[index % len(sizes)], Image.Resampling.BICUBIC).save(score / f"{index}_{path.name}")
    return train, score


@pytest.fixture(scope="module")
def exported(images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The trained model and its ONNX, OpenVINO and torch exports."""
    train, _ = images
    work = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    model = Adfa(**SMALL)
    datamodule = MedicalFolder(
        root=train.parent, normal_dir=train.name, abnormal_dir="abnormal", train_batch_size=8, eval_batch_size=8
    )
    _engine(work / "fit", max_epochs=1).fit(model, datamodule=datamodule)
    model.eval()
    engine = _engine(work / "export")
    return {
        "model": model,
        "onnx": engine.export(model, "onnx", export_root=work / "onnx"),
        "openvino": engine.export(model, "openvino", export_root=work / "openvino"),
        "torch": engine.export(model, "torch", export_root=work / "torch"),
    }


def _checkpoint(model: Adfa, folder: Path, work: Path, batch_size: int | None) -> Scores:
    if batch_size is None:  # a bare folder: anomalib's PredictDataset and PIL reader
        batches = _engine(work).predict(model, data_path=folder)
    else:
        datamodule = MedicalFolder(predict_dir=folder, eval_batch_size=batch_size)
        batches = _engine(work).predict(model, datamodule=datamodule)
    return {
        Path(path).name: (float(score), int(label))
        for batch in batches
        for path, score, label in zip(batch.image_path, batch.pred_score, batch.pred_label, strict=True)
    }


def _inferencer(inferencer: object, paths: list[Path]) -> Scores:
    predictions = {path.name: inferencer.predict(str(path)) for path in paths}
    return {name: (float(p.pred_score.item()), int(p.pred_label.item())) for name, p in predictions.items()}


def _runtime(run: object, paths: list[Path]) -> Scores:
    scores = {}
    for path in paths:
        outputs = run(read_image(path, as_tensor=True).unsqueeze(0).numpy())
        scores[path.name] = (float(outputs["pred_score"].item()), int(outputs["pred_label"].item()))
    return scores


def _adfa_predict(model_path: Path, paths: list[Path]) -> Scores:
    return {p.path.name: (p.score, p.label) for p in predict(ExportedModel(model_path), paths)}


def _onnxruntime(onnx_path: Path) -> object:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return lambda batch: dict(zip(names, session.run(None, {"input": batch}), strict=True))


def _openvino(xml_path: Path, precision: str) -> object:
    compiled = ov.Core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    return lambda batch: {next(iter(port.names)): value for port, value in compiled(batch).items()}


@pytest.fixture(scope="module")
def reference(exported: dict[str, object], images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    scores = _checkpoint(exported["model"], images[1], tmp_path_factory.mktemp("b1"), batch_size=1)
    assert {label for _, label in scores.values()} == {0, 1}, "the parity check needs both labels among the images"
    return scores


def _assert_same(path_name: str, scores: Scores, reference: Scores, tolerance: float) -> None:
    assert scores.keys() == reference.keys()
    flipped = sorted(name for name, (_, label) in scores.items() if label != reference[name][1])
    assert not flipped, f"{path_name} changes the label of {flipped}"
    worst = max(abs(score - reference[name][0]) for name, (score, _) in scores.items())
    print(f"{path_name}: {len(scores)} images, labels equal, max normalised score difference {worst:.2e}")
    assert worst <= tolerance, f"{path_name}: normalised scores differ by up to {worst:.2e}"


@pytest.mark.parametrize("path_name", ["checkpoint_batch8", "anomalib_folder"])
def test_checkpoint_paths_agree_with_batch_one(
    path_name: str, exported: dict, images: tuple[Path, Path], reference: Scores, tmp_path: Path
) -> None:
    batch_size = 8 if path_name == "checkpoint_batch8" else None
    scores = _checkpoint(exported["model"], images[1], tmp_path, batch_size)
    _assert_same(path_name, scores, reference, F32_SCORE_TOLERANCE)


def test_exported_paths_agree_with_the_checkpoint(
    exported: dict,
    images: tuple[Path, Path],
    reference: Scores,
    monkeypatch: pytest.MonkeyPatch,
    openvino_default_is_bfloat16: bool,
) -> None:
    paths = sorted(images[1].iterdir())
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's TorchInferencer unpickles the file this test wrote
    float32_paths = {
        "torch_inferencer": _inferencer(TorchInferencer(exported["torch"], device="cpu"), paths),
        "onnxruntime": _runtime(_onnxruntime(exported["onnx"]), paths),
        "openvino_f32": _runtime(_openvino(exported["openvino"], "f32"), paths),
        "adfa_predict_openvino": _adfa_predict(exported["openvino"], paths),
        "adfa_predict_onnx": _adfa_predict(exported["onnx"], paths),
    }
    if not openvino_default_is_bfloat16:
        float32_paths["openvino_inferencer_default"] = _inferencer(OpenVINOInferencer(exported["openvino"]), paths)
    for name, scores in float32_paths.items():
        _assert_same(name, scores, reference, F32_SCORE_TOLERANCE)


def test_bfloat16_openvino_keeps_every_decision_outside_its_stated_bound(
    exported: dict,
    images: tuple[Path, Path],
    reference: Scores,
    bfloat16_bound: float,
    openvino_default_is_bfloat16: bool,
) -> None:
    paths = sorted(images[1].iterdir())
    runs = {"openvino_bf16": _runtime(_openvino(exported["openvino"], "bf16"), paths)}
    if openvino_default_is_bfloat16:
        runs["openvino_inferencer_default"] = _inferencer(OpenVINOInferencer(exported["openvino"]), paths)
    for name, scores in runs.items():
        drift = {key: abs(score - reference[key][0]) for key, (score, _) in scores.items()}
        print(f"{name}: max normalised score drift {max(drift.values()):.2e} over {len(drift)} images")
        assert max(drift.values()) <= bfloat16_bound
        far = [key for key, (score, _) in reference.items() if abs(score - 0.5) > bfloat16_bound]
        flipped = [key for key in far if scores[key][1] != reference[key][1]]
        assert not flipped, f"{name} changes the label of {flipped}"


def test_adfa_predict_refuses_a_device_it_cannot_run_in_float32(exported: dict) -> None:
    # That it runs the CPU in float32 on a bfloat16 CPU is shown by adfa_predict_openvino's parity above.
    with pytest.raises(ValueError, match=r"cannot run .* on device 'NOSUCHDEVICE' in float32"):
        ExportedModel(exported["openvino"], device="NOSUCHDEVICE")
