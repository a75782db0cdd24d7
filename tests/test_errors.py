"""Input errors reach the user as their message alone, from ``anomalib`` and ``anomalib-adfa``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_adfa.data.errors import CorruptImageError
from anomalib_adfa.errors import (
    BackboneWeightsError,
    ConfigurationError,
    install_cli_excepthook,
    user_error,
)

ANOMALIB = Path(sys.executable).with_name("anomalib")
ANOMALIB_ADFA = Path(sys.executable).with_name("anomalib-adfa")
LITE0 = ["--model", "Adfa", "--model.backbone", "tf_efficientnet_lite0", "--model.backbone_weights", "packaged"]
SMALL = ["--model.image_size", "[40, 40]", "--model.center_crop_size", "[32, 32]"]


def test_user_error_is_found_in_the_chain_or_quoted_by_jsonargparse() -> None:
    cause = BackboneWeightsError("--model.backbone_weights: no such file: /x.pth")
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = cause
    assert user_error(wrapped) is cause
    # jsonargparse quotes the message, re-indented, inside its own ValueError without chaining it.
    quoted = ValueError(
        "Does not validate against any of the Union subtypes\n  - --model.backbone_weights: no\n    such file: /x.pth"
    )
    assert user_error(quoted) is cause
    assert user_error(ValueError("an unrelated bug")) is None


def test_excepthook_prints_the_message_and_keeps_tracebacks_of_bugs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, trace: seen.append(error))
    install_cli_excepthook()
    install_cli_excepthook()  # idempotent: still one layer
    error = ConfigurationError("--model.center_crop_size (224, 224) is larger than --model.image_size (64, 64)")
    sys.excepthook(type(error), error, None)
    assert capsys.readouterr().err == f"error (ConfigurationError): {error}\n"
    bug = KeyError("bug")
    sys.excepthook(type(bug), bug, None)
    assert seen == [bug]


def _run(command: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, cwd=cwd, timeout=600, check=False
    )


def _error_block(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines from the error on; fails when there is a traceback anywhere."""
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output, output[-3000:]
    lines = output.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("error ("))
    return lines[start:]


def test_three_user_mistakes_print_a_few_lines_without_traceback(phantom_pngs, tmp_path: Path) -> None:
    # 1. wrong data root
    wrong_root = ["--data", "BrainMRI", "--data.root", tmp_path / "nowhere"]
    result = _run([ANOMALIB, "train", *LITE0, *SMALL, *wrong_root], tmp_path)
    block = _error_block(result)
    assert block[0].startswith("error (DatasetLayoutError): BrainMRI: no usable dataset at")
    assert len(block) <= 10
    # 2. a corrupt image in the training folder
    data = tmp_path / "data"
    for folder in (phantom_pngs.normal_dir, phantom_pngs.abnormal_dir):
        target = data / folder.name
        target.mkdir(parents=True)
        for image in folder.glob("*.png"):
            (target / image.name).write_bytes(image.read_bytes())
    (data / phantom_pngs.normal_dir.name / "broken.png").write_text("not an image")
    folder_options = ["--data", "anomalib_adfa.data.MedicalFolder", "--data.root", data, "--data.normal_dir"]
    folder_options += [phantom_pngs.normal_dir.name, "--data.abnormal_dir", phantom_pngs.abnormal_dir.name]
    block = _error_block(_run([ANOMALIB, "train", *LITE0, *SMALL, *folder_options], tmp_path))
    assert block[0].startswith("error (CorruptImageError)")
    assert any("broken.png" in line for line in block)
    assert len(block) <= 3
    # 3. an option value that cannot work (raised while jsonargparse builds the model)
    bad = [*LITE0, "--model.image_size", "[64, 64]"]  # the default crop is 224
    block = _error_block(_run([ANOMALIB, "train", *bad, *folder_options], tmp_path))
    assert block == [
        "error (ConfigurationError): --model.center_crop_size (224, 224) is larger than --model.image_size (64, 64); "
        "give a crop at most the image size, or null for none"
    ]


def test_weights_errors_name_the_flags(tmp_path: Path) -> None:
    missing = tmp_path / "no.pth"
    weights = ["--model.backbone_weights", missing]
    result = _run([ANOMALIB, "train", *LITE0[:4], *weights, "--data", "BrainMRI", "--data.root", tmp_path], tmp_path)
    (line,) = _error_block(result)
    assert line.startswith(f"error (BackboneWeightsError): --model.backbone_weights: no such file: {missing}")
    assert "--model.backbone tf_efficientnet_lite0 --model.backbone_weights packaged" in line


def test_bare_adfa_offline_says_what_to_pass_at_once(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE stands for a machine without the hub; the empty cache for one that never downloaded WR50.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    command = [str(ANOMALIB), "train", "--model", "Adfa", "--data", "BrainMRI", "--data.root", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600, check=False)
    (line,) = _error_block(result)
    assert "--model.backbone wide_resnet50_2: its ImageNet weights are not in the local cache" in line
    assert "--model.backbone tf_efficientnet_lite0 --model.backbone_weights packaged" in line
    assert "Retrying" not in result.stderr


def test_anomalib_adfa_prints_input_errors_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from anomalib_adfa import cli
    from anomalib_adfa.report import visual_report

    def unreadable(run_folder: Path, output: Path | None) -> Path:
        raise CorruptImageError(f"1 image file(s) cannot be read; fix or remove them:\n  {run_folder}/a.png")

    monkeypatch.setattr(visual_report, "write_report", unreadable)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"anomalib-adfa: error (CorruptImageError): 1 image file(s) cannot be read; fix or remove them:\n"
        f"  {tmp_path}/a.png\n"
    )
