"""Prediction on DICOM: a model trained on PNGs scores DICOM copies identically, from a checkpoint and exported.

One tiny model (Lite0 with random weights, 40 px, 1 epoch) is trained on the phantom PNGs; its DICOM copies are
8-bit MONOCHROME2, MONOCHROME1 without extension, and 16-bit files (see ``tests/conftest.py::dicom_copy``).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.engine import Engine

from anomalib_adfa import Adfa
from anomalib_adfa.data import MedicalFolder, load_image

pytest.importorskip("pydicom", reason="the dicom extra is not installed: pip install 'anomalib-adfa[dicom]'")
pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'anomalib-adfa[export]'")

SMALL = {
    "backbone": "tf_efficientnet_lite0",
    "layers": ("blocks.1", "blocks.2", "blocks.4"),
    "pre_trained": False,
    "image_size": (40, 40),
    "center_crop_size": (32, 32),
}
FOLDERS = {
    "normal_dir": "train/good",
    "normal_test_dir": "test/good",
    "abnormal_dir": "test/lesion",
    "mask_dir": "ground_truth/lesion",
}
TRAINING_STACK = ("lightning", "lightning_fabric", "pytorch_lightning", "anomalib", "timm")
RTOL = 1e-3  # exported graph against torch, as in tests/test_export.py


def _engine(root: Path) -> Engine:
    return Engine(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root)


def _key(path: str | Path, root: Path) -> str:
    """Image identity across the PNG and DICOM trees: folder and stem."""
    relative = Path(path).relative_to(root)
    return str(relative.parent / relative.name.removesuffix(".png").removesuffix(".dcm"))


@pytest.fixture(scope="module")
def trained(phantom_pngs, tmp_path_factory: pytest.TempPathFactory) -> Adfa:
    """ADFA trained on the PNGs, its thresholds fitted on their validation copy of the test split."""
    torch.manual_seed(0)
    model = Adfa(**SMALL, visualizer=False)
    datamodule = MedicalFolder(root=phantom_pngs.root, train_batch_size=3, eval_batch_size=4, **FOLDERS)
    _engine(tmp_path_factory.mktemp("train")).fit(model, datamodule=datamodule)
    return model.eval()


def _predict(model: Adfa, folder: Path, root: Path, tmp_path: Path) -> dict[str, tuple[float, bool, torch.Tensor]]:
    batches = _engine(tmp_path).predict(model, datamodule=MedicalFolder(predict_dir=folder, eval_batch_size=4))
    return {
        _key(path, root): (float(score), bool(label), anomaly_map)
        for batch in batches
        for path, score, label, anomaly_map in zip(
            batch.image_path, batch.pred_score, batch.pred_label, batch.anomaly_map, strict=True
        )
    }


def test_dicom_copies_score_like_the_pngs_they_came_from(
    trained: Adfa, phantom_pngs, phantom_dicoms: Path, tmp_path: Path
) -> None:
    from_png = _predict(trained, phantom_pngs.root / "test", phantom_pngs.root, tmp_path / "png")
    from_dicom = _predict(trained, phantom_dicoms / "test", phantom_dicoms, tmp_path / "dicom")
    assert set(from_dicom) == set(from_png)
    assert len(from_png) == 6
    for key, (score, label, anomaly_map) in from_png.items():
        dicom_score, dicom_label, dicom_map = from_dicom[key]
        assert dicom_score == pytest.approx(score, abs=1e-5), key
        assert dicom_label == label, key
        torch.testing.assert_close(dicom_map, anomaly_map, atol=1e-5, rtol=1e-5)
    assert len({round(score, 4) for score, _, _ in from_png.values()}) > 1, "scores should differ between images"

    # engine.test on the DICOM tree prints the metrics of the PNG tree.
    metrics = {}
    for name, root in (("png", phantom_pngs.root), ("dicom", phantom_dicoms)):
        datamodule = MedicalFolder(root=root, eval_batch_size=4, **FOLDERS)
        (metrics[name],) = _engine(tmp_path / f"test_{name}").test(trained, datamodule=datamodule, verbose=False)
    assert metrics["dicom"]["image_AUROC"] == pytest.approx(metrics["png"]["image_AUROC"], abs=1e-6)
    assert metrics["dicom"]["pixel_AUROC"] == pytest.approx(metrics["png"]["pixel_AUROC"], abs=1e-5)


@pytest.fixture(scope="module")
def exported(trained: Adfa, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained model exported by anomalib's Engine to ONNX, and that graph converted to OpenVINO.

    anomalib's OpenVINO export converts its ONNX export the same way (``ov.convert_model``); converting the
    one ONNX file here saves a second, slow trace.
    """
    ov = pytest.importorskip(
        "openvino", reason="the export extra is not installed: pip install 'anomalib-adfa[export]'"
    )
    root = tmp_path_factory.mktemp("export")
    onnx_path = Path(_engine(root).export(trained, "onnx", export_root=root / "onnx"))
    xml_path = root / "openvino" / "model.xml"
    xml_path.parent.mkdir()
    ov.save_model(ov.convert_model(onnx_path), xml_path, compress_to_fp16=False)  # as anomalib without compression
    return {"onnx": onnx_path, "openvino": xml_path}


PROBE = textwrap.dedent(
    """
    import json, sys
    from anomalib_adfa.deploy.predict import main
    status = main(sys.argv[2:])
    stack = sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[1]))
    stack += [m for m in ("anomalib_adfa.lightning_model", "anomalib_adfa.torch_model") if m in sys.modules]
    print(json.dumps({"status": status, "training_stack": stack}))
    """
)


def _run_predictor(model: Path, inputs: list[Path], output: Path) -> dict[str, tuple[float, int]]:
    """Run the exported-model predictor in a fresh process; check it loaded nothing of the training stack."""
    command = [sys.executable, "-c", PROBE, json.dumps(TRAINING_STACK), str(model), *map(str, inputs)]
    result = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"status": 0, "training_stack": []}
    with (output / "scores.csv").open(newline="") as handle:
        return {row["image_path"]: (float(row["pred_score"]), int(row["pred_label"])) for row in csv.DictReader(handle)}


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exported_model_scores_dicom_in_a_fresh_process_like_torch(
    runtime: str,
    trained: Adfa,
    exported: dict[str, Path],
    phantom_pngs,
    phantom_dicoms: Path,
    dicom_patient_name: str,
    tmp_path: Path,
) -> None:
    from_dicom = _run_predictor(exported[runtime], [phantom_dicoms / "test"], tmp_path / "dicom")
    from_png = _run_predictor(exported[runtime], [phantom_pngs.root / "test"], tmp_path / "png")
    # The exported graph is the model's forward, whose exported resize is the antialiased one of the datamodule path
    # (tests/test_decision_parity.py compares the two paths).
    with torch.no_grad():
        expected = {
            _key(png, phantom_pngs.root): (output.pred_score.item(), output.pred_label.item())
            for png in sorted((phantom_pngs.root / "test").rglob("*.png"))
            for output in [trained(load_image(png).unsqueeze(0))]
        }
    dicom_by_key = {_key(path, phantom_dicoms): value for path, value in from_dicom.items()}
    png_by_key = {_key(path, phantom_pngs.root): value for path, value in from_png.items()}
    assert set(dicom_by_key) == set(png_by_key) == set(expected)
    for key, (score, label) in expected.items():
        assert dicom_by_key[key][0] == pytest.approx(png_by_key[key][0], abs=1e-5), key
        assert dicom_by_key[key][1] == png_by_key[key][1] == int(label), key
        assert abs(dicom_by_key[key][0] - score) <= RTOL * max(abs(score), 1e-6) + 1e-6, key

    overlays = sorted(path.name for path in (tmp_path / "dicom" / "overlays").iterdir())
    assert overlays == sorted(f"{Path(path).name}.png" for path in from_dicom)
    for output in (tmp_path / "dicom").rglob("*"):
        if output.is_file():
            content = output.read_bytes()
            for tag_value in (dicom_patient_name, "PID-0451-RECOGNISABLE", "19230405"):
                assert tag_value.encode() not in content, f"{tag_value} found in {output}"
            assert b"Doe" not in content, output


def test_cli_predict_subcommand_reports_bad_files_in_one_message(
    exported: dict[str, Path], phantom_dicoms: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    good = sorted((phantom_dicoms / "test/lesion").iterdir())[0]
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / "cut.dcm").write_bytes(good.read_bytes()[:300])
    (folder / "notes.dcm").write_text("not an image")
    command = [sys.executable, "-m", "anomalib_adfa.cli", "predict", str(exported["openvino"]), str(folder)]
    result = subprocess.run([*command, "--output", str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "2 image file(s) cannot be read" in result.stderr
    assert f"{folder / 'cut.dcm'}: " in result.stderr
    assert f"{folder / 'notes.dcm'}: not a DICOM file" in result.stderr
    assert not (tmp_path / "out").exists()

    (folder / "cut.dcm").unlink()
    (folder / "notes.dcm").unlink()
    result = subprocess.run([*command, "--output", str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 image(s) scored" in result.stdout
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open(newline="")))
    assert [Path(row["image_path"]).name for row in rows] == [good.name]
    assert np.isfinite(float(rows[0]["pred_score"]))


def test_read_options_reach_the_exported_model_predictor(
    exported: dict[str, Path], phantom_pngs, dicom_writer, tmp_path: Path
) -> None:
    from PIL import Image

    from anomalib_adfa.data import CorruptImageError, ReadOptions
    from anomalib_adfa.deploy.predict import ExportedModel, predict

    pngs = sorted(phantom_pngs.abnormal_dir.glob("*.png"))[:2]
    frames = np.stack([np.asarray(Image.open(png).convert("L")) for png in pngs])
    cine = dicom_writer(tmp_path / "cine.dcm", frames)
    model = ExportedModel(exported["onnx"])
    with pytest.raises(CorruptImageError, match=r"cine\.dcm: multi-frame image \(2 frames\)"):
        predict(model, [cine])
    (second_frame,) = predict(model, [cine], ReadOptions(frame=1), overlay_dir=tmp_path / "overlays")
    (second_png,) = predict(model, [pngs[1]])
    assert second_frame.score == pytest.approx(second_png.score, abs=1e-6)
    np.testing.assert_allclose(second_frame.anomaly_map, second_png.anomaly_map, atol=1e-6)
    assert [path.name for path in (tmp_path / "overlays").iterdir()] == ["cine.dcm.png"]


def test_an_earlier_score_table_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_adfa.deploy.predict import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.csv").write_text("earlier\n")
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "model.onnx"), str(tmp_path), "--output", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "already holds scores.csv; give a new folder" in capsys.readouterr().err
    assert (tmp_path / "out" / "scores.csv").read_text() == "earlier\n"
