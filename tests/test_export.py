"""Export of a trained ADFA model to ONNX and OpenVINO, anomalib's inferencers, and predict outputs.

One model is trained for one epoch (fast Lite0 configuration, random backbone weights) on the real
Covid images, or on the phantom set where ``../shared/data`` is absent, and shared by every test.
Parity is decisions first: ``pred_label`` of every test image must agree with torch, then scores and
maps, measured as ``max |exported - torch| / max |torch|`` and printed (``pytest -s``). The consumers
run as a user runs them: in a fresh process, without the plugin, with their defaults.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from anomalib.data import Folder
from anomalib.data.utils import read_image
from anomalib.deploy import TorchInferencer
from anomalib.engine import Engine
from torchvision.transforms.v2.functional import resize

from anomalib_adfa import Adfa
from anomalib_adfa.callbacks import ScoreCSVWriter
from anomalib_adfa.deploy.export import ONNX_OPSET_VERSION, PRECISION_ATTRIBUTE, export_checkpoint
from anomalib_adfa.outputs import checkpoint_run_folder
from anomalib_adfa.scoring import TOPK_MODES, PatchScorer, fused
from anomalib_adfa.synthetic import ABNORMAL_DIR, NORMAL_DIR, NORMAL_TEST_DIR, make_phantom_dataset

pytestmark = pytest.mark.slow

FAST_CONFIG = {
    "backbone": "tf_efficientnet_lite0",
    "layers": ("blocks.1", "blocks.2", "blocks.4"),
    "pre_trained": False,
    "image_size": (72, 72),
    "center_crop_size": (64, 64),
}
CLI_MODEL_ARGS = [
    "--model",
    "Adfa",
    "--model.backbone",
    "tf_efficientnet_lite0",
    "--model.layers",
    "[blocks.1, blocks.2, blocks.4]",
    "--model.pre_trained",
    "false",
    "--model.image_size",
    "[72, 72]",
    "--model.center_crop_size",
    "[64, 64]",
]
RTOL = 1e-3
ANOMALIB_CLI = Path(sys.executable).with_name("anomalib")
COVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid19_xray" / "xray_dataset_covid19"

# Runs every test image through anomalib's OpenVINOInferencer and an ONNX Runtime session, both with their
# defaults (OpenVINO's default device and precision, no config), in a process that never imports the plugin.
DEFAULT_CONSUMERS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime
    from anomalib.data.utils import read_image
    from anomalib.deploy import OpenVINOInferencer

    xml_path, onnx_path, *paths = sys.argv[1:]
    inferencer = OpenVINOInferencer(xml_path)
    session = onnxruntime.InferenceSession(onnx_path)
    names = [output.name for output in session.get_outputs()]
    results = {"openvino": [], "onnxruntime": []}
    for path in paths:
        prediction = inferencer.predict(path)
        results["openvino"].append({"score": float(prediction.pred_score.item()),
                                    "label": int(prediction.pred_label.item()),
                                    "map": np.asarray(prediction.anomaly_map).ravel().tolist()})
        image = read_image(path, as_tensor=True).unsqueeze(0).numpy()
        outputs = dict(zip(names, session.run(None, {"input": image})))
        results["onnxruntime"].append({"score": float(outputs["pred_score"].item()),
                                       "label": int(outputs["pred_label"].item()),
                                       "map": outputs["anomaly_map"].ravel().tolist()})
    assert "anomalib_adfa" not in sys.modules, "the exported model needed the ADFA plugin"
    print(json.dumps(results))
    """
)


def relative_difference(actual: np.ndarray | torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``."""
    expected_array = expected.detach().float().numpy()
    difference = np.abs(np.asarray(actual, dtype=np.float32).reshape(expected_array.shape) - expected_array).max()
    return float(difference / max(np.abs(expected_array).max(), 1e-12))


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The real Covid images (20 + 20 test images), or phantoms where ``../shared/data`` is absent."""
    if COVID.is_dir():
        return COVID, {"normal_dir": "train/NORMAL", "normal_test_dir": "test/NORMAL", "abnormal_dir": "test/PNEUMONIA"}
    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, n_train=16, n_test_normal=10, n_test_abnormal=10, image_size=64, seed=5)
    return root, {"normal_dir": NORMAL_DIR, "normal_test_dir": NORMAL_TEST_DIR, "abnormal_dir": ABNORMAL_DIR}


@pytest.fixture(scope="module")
def datamodule(dataset_root: tuple[Path, dict[str, str]]) -> Folder:
    root, folders = dataset_root
    return Folder(
        name="export",
        root=root,
        **folders,
        val_split_mode="same_as_test",
        train_batch_size=16,
        eval_batch_size=16,
        num_workers=0,
    )


@pytest.fixture(scope="module")
def trained(datamodule: Folder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Adfa, Path]:
    """The trained model (thresholds from the validation images) and its checkpoint."""
    torch.manual_seed(0)
    model = Adfa(**FAST_CONFIG)
    engine = Engine(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path_factory.mktemp("train"),
    )
    engine.fit(model, datamodule=datamodule)
    assert torch.isfinite(model.post_processor.image_threshold)
    return model.eval(), Path(engine.trainer.checkpoint_callback.best_model_path)


@pytest.fixture(scope="module")
def test_images(dataset_root: tuple[Path, dict[str, str]]) -> list[Path]:
    """Every test image, normal and abnormal."""
    root, folders = dataset_root
    folders_ = (folders["normal_test_dir"], folders["abnormal_dir"])
    return sorted(
        path
        for folder in folders_
        for path in (root / folder).iterdir()
        if path.suffix.lower() in {".png", ".jpg", ".jpeg"}
    )


@pytest.fixture(scope="module")
def image_paths(test_images: list[Path]) -> list[Path]:
    """Two normal and two abnormal test images."""
    half = len(test_images) // 2
    return [*test_images[:2], *test_images[half : half + 2]]


def _torch_predictions(model: Adfa, paths: list[Path]) -> list:
    with torch.no_grad():
        return [model(read_image(path, as_tensor=True).unsqueeze(0)) for path in paths]


def _run_default_consumers(xml_path: Path, onnx_path: Path, paths: list[Path], cwd: Path) -> dict[str, list[dict]]:
    """Predictions of :data:`DEFAULT_CONSUMERS` (OpenVINO and ONNX Runtime, fresh process) for ``paths``."""
    result = subprocess.run(
        [sys.executable, "-c", DEFAULT_CONSUMERS, str(xml_path), str(onnx_path), *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_same_decisions(
    runtime: str,
    mode: str,
    exported: list[dict],
    expected: list,
    paths: list[Path],
    bfloat16_bound: float | None = None,
) -> None:
    """Labels and scores of ``exported`` against torch's ``expected`` predictions.

    In float32 every label must agree and scores and maps differ by at most :data:`RTOL` relative. With
    ``bfloat16_bound`` (OpenVINO at its default precision on a CPU with native bfloat16) normalised scores and maps
    may move by up to the bound, and every image farther than it from the threshold must keep its label.
    """
    band = bfloat16_bound or 0.0
    flipped = [
        path.name
        for path, row, prediction in zip(paths, exported, expected, strict=True)
        if row["label"] != int(prediction.pred_label.item()) and abs(prediction.pred_score.item() - 0.5) > band
    ]
    assert not flipped, f"{runtime} ({mode}) changes the label of {flipped}"
    for field in ("score", "map"):
        pairs = [
            (np.asarray(row[field]), prediction.pred_score if field == "score" else prediction.anomaly_map)
            for row, prediction in zip(exported, expected, strict=True)
        ]
        if bfloat16_bound is None:
            worst = max(relative_difference(got, want) for got, want in pairs)
            limit, unit = RTOL, "relative"
        else:
            worst = max(float(np.abs(got.ravel() - want.detach().numpy().ravel()).max()) for got, want in pairs)
            limit, unit = bfloat16_bound, "absolute, bfloat16"
        print(f"{mode:>9} {runtime:>11} default consumer, {len(paths)} images: {field} {worst:.2e} ({unit})")
        assert worst <= limit, f"{runtime} {field} differs from torch by {worst:.2e} in mode {mode}"


@pytest.mark.parametrize("mode", TOPK_MODES)
def test_default_consumers_give_torch_labels_on_every_test_image(
    mode: str,
    trained: tuple[Adfa, Path],
    datamodule: Folder,
    test_images: list[Path],
    tmp_path: Path,
    bfloat16_bound: float,
    openvino_default_is_bfloat16: bool,
) -> None:
    model = copy.deepcopy(trained[0])
    model.model.scorer = PatchScorer(topk_mode=mode)
    engine = Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    engine.validate(model, datamodule=datamodule)  # normalisation and thresholds of this mode
    expected = _torch_predictions(model.eval(), test_images)
    labels = {int(prediction.pred_label.item()) for prediction in expected}
    assert labels == {0, 1}, "the parity check needs both decisions among the torch labels"

    onnx_path = engine.export(model, "onnx", export_root=tmp_path / "onnx")
    graph = onnx.load(onnx_path)
    assert {entry.version for entry in graph.opset_import if entry.domain == ""} == {ONNX_OPSET_VERSION}
    assert not {node.op_type for node in graph.graph.node} & {"If", "Loop", "Scan"}
    assert [tensor.name for tensor in graph.graph.input] == ["input"]  # the centre bank is a constant
    assert any(tuple(tensor.dims) == tuple(model.model.centers.shape) for tensor in graph.graph.initializer)
    xml_path = engine.export(model, "openvino", export_root=tmp_path / "openvino")

    exported = _run_default_consumers(xml_path, onnx_path, test_images, tmp_path)
    bound = bfloat16_bound if openvino_default_is_bfloat16 else None
    _assert_same_decisions("openvino", mode, exported["openvino"], expected, test_images, bound)
    _assert_same_decisions("onnxruntime", mode, exported["onnxruntime"], expected, test_images)


def test_exported_graph_takes_other_sizes_and_batches(
    trained: tuple[Adfa, Path], image_paths: list[Path], tmp_path: Path
) -> None:
    model = trained[0]
    # A batch at a size the model was not trained with: the resize to 72 px is part of the graph.
    images = torch.stack([resize(read_image(path, as_tensor=True), [120, 136], antialias=True) for path in image_paths])
    with torch.no_grad():
        expected = model(images)
    xml_path = model.to_openvino(export_root=tmp_path, input_size=None)
    outputs = {
        next(iter(port.names)): value
        for port, value in ov.Core()
        .compile_model(xml_path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(images.numpy())
        .items()
    }
    np.testing.assert_array_equal(outputs["pred_label"], expected.pred_label.numpy())
    for name in ("pred_score", "anomaly_map"):
        assert relative_difference(outputs[name], getattr(expected, name)) <= RTOL


def test_openvino_ir_keeps_float32_unless_another_precision_is_asked_for(
    trained: tuple[Adfa, Path], test_images: list[Path], tmp_path: Path
) -> None:
    model = trained[0]
    pinned = model.to_openvino(export_root=tmp_path / "f32", input_size=None)
    free = model.to_openvino(export_root=tmp_path / "bf16", input_size=None, ov_kwargs={"inference_precision": "bf16"})
    core = ov.Core()
    layers = [op for op in core.read_model(pinned).get_ops()]
    marked = [op for op in layers if "DisablePrecisionConversion_0" in op.get_rt_info()]
    assert len(marked) == len(layers)
    assert not any("DisablePrecisionConversion_0" in op.get_rt_info() for op in core.read_model(free).get_ops())
    assert pinned.read_text().count(f'name="{PRECISION_ATTRIBUTE}"') == len(layers)

    # A CPU whose OpenVINO default is bfloat16, emulated by asking for it: the marks keep most of the graph in
    # float32 (OpenVINO compiles part of it into nodes that do not inherit them), so the drift shrinks.
    images = np.stack([read_image(path, as_tensor=True).numpy() for path in test_images[:8]])
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).pred_score
    drift = {}
    for name, path in (("marked", pinned), ("unmarked", free)):
        compiled = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        scores = next(value for port, value in compiled(images).items() if "pred_score" in port.names)
        drift[name] = relative_difference(scores, expected)
    print(f"forced bfloat16: score drift {drift['marked']:.2e} with the float32 marks, {drift['unmarked']:.2e} without")
    assert drift["marked"] < drift["unmarked"]
    with pytest.raises(ValueError, match="inference_precision must be"):
        model.to_openvino(export_root=tmp_path / "bad", input_size=None, ov_kwargs={"inference_precision": "int4"})


def test_cli_openvino_export_runs_in_a_default_openvino_inferencer_without_the_plugin(
    trained: tuple[Adfa, Path],
    image_paths: list[Path],
    tmp_path: Path,
    bfloat16_bound: float,
    openvino_default_is_bfloat16: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, checkpoint = trained
    command = [
        str(ANOMALIB_CLI),
        "export",
        *CLI_MODEL_ARGS,
        "--export_type",
        "openvino",
        "--ckpt_path",
        str(checkpoint),
    ]
    result = subprocess.run(
        [*command, "--default_root_dir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The export lands in the checkpoint's run folder, not in --default_root_dir, and the log says where.
    run = checkpoint_run_folder(checkpoint)
    xml_path = run / "weights" / "openvino" / "model.xml"
    assert xml_path.is_file()
    assert str(xml_path) in result.stdout + result.stderr
    assert not list(tmp_path.rglob("model.xml"))
    onnx_path = model.to_onnx(export_root=tmp_path / "onnx", input_size=None)

    exported = _run_default_consumers(xml_path, onnx_path, image_paths, tmp_path)
    expected = _torch_predictions(model, image_paths)
    bound = bfloat16_bound if openvino_default_is_bfloat16 else None
    _assert_same_decisions("openvino", "cli", exported["openvino"], expected, image_paths, bound)

    # A second export of the same checkpoint (here the Python form) goes to a new folder, leaving the first.
    first = xml_path.read_bytes()
    engine = Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="anomalib_adfa.deploy.export"):
        second = export_checkpoint(engine, Adfa(**FAST_CONFIG), "openvino", checkpoint)
    assert second == run / "weights" / "openvino-1" / "model.xml"
    assert second.is_file()
    assert xml_path.read_bytes() == first
    assert str(second.parent) in caplog.text


def test_torch_export_runs_in_torch_inferencer(
    trained: tuple[Adfa, Path], image_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = trained[0]
    engine = Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferencer = TorchInferencer(engine.export(model, "torch", export_root=tmp_path), device="cpu")
    with torch.no_grad():
        prediction = inferencer.predict(image_paths[-1])
        expected = model(read_image(image_paths[-1], as_tensor=True).unsqueeze(0))
    torch.testing.assert_close(prediction.pred_score, expected.pred_score)
    torch.testing.assert_close(prediction.anomaly_map, expected.anomaly_map.squeeze(1))


def test_cli_export_refuses_a_checkpoint_trained_with_another_configuration(
    trained: tuple[Adfa, Path], tmp_path: Path
) -> None:
    command = [str(ANOMALIB_CLI), "export", *CLI_MODEL_ARGS, "--model.gamma_d", "8", "--export_type", "onnx"]
    result = subprocess.run(
        [*command, "--ckpt_path", str(trained[1]), "--default_root_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert "IncompatibleCheckpointError" in result.stderr
    assert "gamma_d: checkpoint has 4, this model has 8" in result.stderr
    assert not list(tmp_path.rglob("*.onnx"))
    assert not list(checkpoint_run_folder(trained[1]).rglob("*.onnx"))


def test_predict_writes_overlays_and_a_score_csv(
    trained: tuple[Adfa, Path], image_paths: list[Path], tmp_path: Path
) -> None:
    model = trained[0]
    folder = tmp_path / "images"
    folder.mkdir()
    for path in image_paths:
        (folder / path.name).write_bytes(path.read_bytes())
    engine = Engine(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path / "run",
        callbacks=[ScoreCSVWriter()],
    )
    predictions = engine.predict(model, data_path=folder)  # one image per batch: rows are held across batches

    expected = {
        Path(path).name: (score.item(), int(label))
        for batch in predictions
        for path, score, label in zip(batch.image_path, batch.pred_score, batch.pred_label, strict=True)
    }
    (csv_path,) = (tmp_path / "run").rglob("scores.csv")  # anomalib versions the run folder
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(image_paths)
    for row in rows:
        # The post-processed (normalised, thresholded) values, not the raw scores of on_predict_batch_end.
        assert (float(row["pred_score"]), int(row["pred_label"])) == expected[Path(row["image_path"]).name]
        assert 0.0 < float(row["pred_score"]) < 1.0
    overlays = {path.name for path in (tmp_path / "run").rglob("*.jpeg")}
    assert overlays == {path.name for path in image_paths}


def test_exported_chunked_scoring_takes_any_batch_size(
    trained: tuple[Adfa, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At 224 px the patch scoring runs in several chunks; a small chunk budget makes this 64 px model do the same.
    num_centers = trained[0].model.centers.shape[0]
    chunk_elements = num_centers * (num_centers // 3 + 1)  # three chunks of rows per image
    monkeypatch.setattr(fused.nearest_center_scores, "__defaults__", (chunk_elements, None))
    model = copy.deepcopy(trained[0]).eval()
    onnx_path = model.to_onnx(export_root=tmp_path, input_size=None)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # neither is the batch size the graph was traced with
        images = torch.rand(batch, 3, 72, 72)
        with torch.no_grad():
            expected = model(images).pred_score
        names = [output.name for output in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
        assert relative_difference(outputs["pred_score"], expected) <= RTOL
