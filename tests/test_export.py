"""Export of a trained ADFA model to ONNX and OpenVINO, anomalib's inferencers, and predict outputs.

One model is trained for one epoch on the real Covid images (fast Lite0 configuration, random
backbone weights) and shared by every test. Parity is measured as ``max |exported - torch| /
max |torch|`` per output and printed (``pytest -s``); the exported graphs take the images at 120 x 136
(batch of 4) and at their native 512 x 512 (inferencer), and resize them to 72 px themselves.
"""

from __future__ import annotations

import copy
import csv
import json
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

from anomalib_adfa import Adfa, patch_scoring
from anomalib_adfa.callbacks import ScoreCSVWriter
from anomalib_adfa.lightning_model import ONNX_OPSET_VERSION, IncompatibleCheckpointError
from anomalib_adfa.patch_scoring import PatchScorer
from anomalib_adfa.soft_topk import TOPK_MODES

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
# OpenVINO's CPU plugin computes in bfloat16 on CPUs that support it unless told otherwise.
OV_F32 = {"INFERENCE_PRECISION_HINT": "f32"}
ANOMALIB_CLI = Path(sys.executable).with_name("anomalib")


def relative_difference(actual: np.ndarray | torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``."""
    expected_array = expected.detach().float().numpy()
    difference = np.abs(np.asarray(actual, dtype=np.float32) - expected_array).max()
    return float(difference / max(np.abs(expected_array).max(), 1e-12))


@pytest.fixture(scope="module")
def datamodule(covid_root: Path) -> Folder:
    root = covid_root
    return Folder(
        name="covid",
        root=root,
        normal_dir="train/NORMAL",
        normal_test_dir="test/NORMAL",
        abnormal_dir="test/PNEUMONIA",
        val_split_mode="same_as_test",
        train_batch_size=16,
        eval_batch_size=16,
        num_workers=0,
    )


@pytest.fixture(scope="module")
def trained(datamodule: Folder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Adfa, Path]:
    """The trained model (thresholds from the anomalous validation images) and its checkpoint."""
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
def image_paths(covid_root: Path) -> list[Path]:
    """Two normal and two pneumonia test images (512 x 512 grey-level JPEGs)."""
    root = covid_root / "test"
    return [path for folder in ("NORMAL", "PNEUMONIA") for path in sorted((root / folder).glob("*.jpeg"))[:2]]


@pytest.mark.parametrize("mode", TOPK_MODES)
def test_exported_graph_matches_torch_in_every_topk_mode(
    mode: str, trained: tuple[Adfa, Path], datamodule: Folder, image_paths: list[Path], tmp_path: Path
) -> None:
    model = copy.deepcopy(trained[0])
    model.model.scorer = PatchScorer(topk_mode=mode)
    engine = Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    engine.validate(model, datamodule=datamodule)  # normalisation and thresholds of this mode
    # A batch at a size the model was not trained with: the resize to 72 px is part of the graph.
    images = torch.stack([resize(read_image(path, as_tensor=True), [120, 136], antialias=True) for path in image_paths])
    with torch.no_grad():
        expected = model.eval()(images)

    onnx_path = engine.export(model, "onnx", export_root=tmp_path)
    graph = onnx.load(onnx_path)
    assert {entry.version for entry in graph.opset_import if entry.domain == ""} == {ONNX_OPSET_VERSION}
    assert not {node.op_type for node in graph.graph.node} & {"If", "Loop", "Scan"}
    assert [tensor.name for tensor in graph.graph.input] == ["input"]  # the centre bank is a constant
    assert any(tuple(tensor.dims) == tuple(model.model.centers.shape) for tensor in graph.graph.initializer)

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_outputs = dict(
        zip([out.name for out in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True)
    )
    compiled = ov.Core().compile_model(ov.convert_model(onnx_path), "CPU", OV_F32)  # what to_openvino converts
    ov_outputs = {next(iter(port.names)): value for port, value in compiled(images.numpy()).items()}

    for runtime, outputs in (("onnxruntime", onnx_outputs), ("openvino", ov_outputs)):
        for name in ("pred_score", "anomaly_map"):
            difference = relative_difference(outputs[name], getattr(expected, name))
            print(f"{mode:>9} {runtime:>11} {name:>11}: max relative difference {difference:.2e}")
            assert difference <= RTOL, f"{runtime} {name} differs from torch by {difference:.2e} in mode {mode}"
        np.testing.assert_array_equal(outputs["pred_label"], expected.pred_label.numpy())


def test_cli_openvino_export_runs_in_openvino_inferencer_without_the_plugin(
    trained: tuple[Adfa, Path], image_paths: list[Path], tmp_path: Path
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
    (xml_path,) = tmp_path.rglob("model.xml")

    script = textwrap.dedent(
        """
        import json, sys
        import openvino
        from anomalib.deploy import OpenVINOInferencer

        inferencer = OpenVINOInferencer(sys.argv[1], device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
        results = []
        for path in sys.argv[2:]:
            prediction = inferencer.predict(path)
            anomaly_map = prediction.anomaly_map
            results.append({"score": prediction.pred_score.item(), "label": bool(prediction.pred_label.item()),
                            "map_max": float(anomaly_map.max()), "map_shape": list(anomaly_map.shape)})
        assert "anomalib_adfa" not in sys.modules, "the exported model needed the ADFA plugin"
        print(json.dumps(results))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(xml_path), *map(str, image_paths)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = json.loads(result.stdout.strip().splitlines()[-1])

    for path, prediction in zip(image_paths, exported, strict=True):
        with torch.no_grad():
            expected = model(read_image(path, as_tensor=True).unsqueeze(0))
        assert prediction["map_shape"][-2:] == list(expected.anomaly_map.shape[-2:])
        assert prediction["label"] == bool(expected.pred_label.item())
        for key, value in (("score", expected.pred_score), ("map_max", expected.anomaly_map.max())):
            difference = relative_difference(np.float32(prediction[key]), value)
            print(f"OpenVINOInferencer {path.name} {key}: max relative difference {difference:.2e}")
            assert difference <= RTOL


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


def test_engine_export_refuses_a_checkpoint_trained_with_another_configuration(
    trained: tuple[Adfa, Path], tmp_path: Path
) -> None:
    engine = Engine(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    requested = Adfa(**{**FAST_CONFIG, "center_crop_size": (56, 56)})
    with pytest.raises(IncompatibleCheckpointError, match=r"center_crop_size: checkpoint has \(64, 64\)"):
        engine.export(requested, "onnx", export_root=tmp_path, ckpt_path=trained[1])
    assert not list(tmp_path.rglob("*.onnx"))


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
    monkeypatch.setattr(patch_scoring.nearest_center_scores, "__defaults__", (3000, None))
    model = copy.deepcopy(trained[0]).eval()
    assert model.model.centers.shape[0] > 3000 // model.model.centers.shape[0]  # more than one chunk
    onnx_path = model.to_onnx(export_root=tmp_path, input_size=None)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # neither is the batch size the graph was traced with
        images = torch.rand(batch, 3, 72, 72)
        with torch.no_grad():
            expected = model(images).pred_score
        names = [output.name for output in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
        assert relative_difference(outputs["pred_score"], expected) <= RTOL
