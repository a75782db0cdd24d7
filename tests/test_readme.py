"""Every shell command of the README runs as written (with small budgets), so the README cannot drift.

The ```bash blocks are read from README.md. Each command is either run, in README order in one working
folder (so the run folders of earlier commands are there for later ones), or listed in :data:`NOT_RUN` with the
reason; a command in neither place fails the test, and so does a stale :data:`NOT_RUN` entry.

What is changed before running, all budgets: epochs (1), the demo's size, ADFA's input size (64 px crop), the
number of images. The data: ``~`` is a temporary home whose ``data/brain_tumor_dataset`` holds 20 normal and 10
tumour images of the real BrainMRI download from ``../shared/data`` when present, else a phantom set in BrainMRI's
layout; ``scans/`` (your own data) is a phantom set; ``datasets/brain_tumor_dataset`` (the benchmark config's root)
is the same BrainMRI folder; ``configs`` is the repository's, as when running from the repository root.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
README = PROJECT_ROOT / "README.md"
BIN = Path(sys.executable).parent

NOT_RUN = {
    "python -m pytest": "this test runs inside pytest",
    "anomalib train --config configs/adfa.yaml": "WR50 weights come from the Hugging Face hub (the README says how)",
    "python -m benchmarks.run": "hours of training; benchmarks/ has its own tests",
    "anomalib test --model Adfa ...": "placeholder (section owned by the localisation work)",
    "anomalib-adfa report results/Adfa/BUSI/v0": "needs the BUSI run of the line above",
    "anomalib train --model Adfa --data BrainMRI --data.root ~/data/brain_tumor_dataset \\\n"
    "    --trainer.accelerator gpu": "needs 4 GPUs",
    "export MASTER_ADDR=": "several machines",
    "anomalib train --model Adfa ... --trainer.devices 4": "several machines with GPUs",
}
"""Start of each command that is not run, and why."""

BUDGETS = (
    (r"--trainer\.max_epochs \d+", "--trainer.max_epochs 1"),
    (r"PL_TRAINER_MAX_EPOCHS=\d+", "PL_TRAINER_MAX_EPOCHS=1"),
    (r"(--config configs/adfa_lite0_cpu\.yaml)", r"\1 --trainer.max_epochs 1"),  # the config sets 10
    (r"anomalib-adfa demo$", "anomalib-adfa demo --epochs 1 --n-train 8 --n-test 4 --image-size 64 --overlays 2"),
    (r"--model\.backbone_weights packaged", "--model.backbone_weights packaged --model.image_size [73,73] "
     "--model.center_crop_size [64,64]"),
)  # fmt: skip


def bash_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        current = ""
        for line in block.splitlines():
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            current += line
            if line.endswith("\\"):
                current += "\n"
                continue
            commands.append(current)
            current = ""
    return commands


def _excused(command: str) -> bool:
    return any(command.split(" && ")[-1].startswith(prefix) for prefix in NOT_RUN)


def runnable(command: str) -> str:
    """The command as run: the part after the install steps of a Quick start line, with small budgets."""
    command = command.split(" && ")[-1]
    command = re.sub(r"\s+#.*$", "", command, flags=re.MULTILINE)
    for pattern, replacement in BUDGETS:
        command = re.sub(pattern, replacement, command, flags=re.MULTILINE)
    return command


def _brainmri(home: Path) -> Path:
    folder = home / "data" / "brain_tumor_dataset"
    folder.parent.mkdir(parents=True)
    real = SHARED_DATA / "brain_tumor_dataset"
    if real.is_dir():  # a small budget of real images: the first 20 normal and 10 tumour slices
        for name, count in (("no", 20), ("yes", 10)):
            (folder / name).mkdir(parents=True)
            for image in sorted((real / name).iterdir())[:count]:
                (folder / name / image.name).symlink_to(image)
        return folder
    from anomalib_adfa.synthetic import make_phantom_dataset

    phantom = make_phantom_dataset(home / "phantom", 12, 8, 8, image_size=64, seed=1)
    for source, target in ((phantom.normal_dir, "no"), (phantom.normal_test_dir, "no"), (phantom.abnormal_dir, "yes")):
        (folder / target).mkdir(parents=True, exist_ok=True)
        for image in source.glob("*.png"):
            (folder / target / f"{source.name}_{image.name}").write_bytes(image.read_bytes())
    return folder


def _own_scans(work: Path) -> None:
    from anomalib_adfa.synthetic import make_phantom_dataset

    phantom = make_phantom_dataset(work / "phantom_scans", 10, 3, 4, image_size=64, seed=2)
    for source, target in ((phantom.normal_dir, "normal"), (phantom.abnormal_dir, "abnormal")):
        (work / "scans" / target).mkdir(parents=True)
        for image in source.glob("*.png"):
            (work / "scans" / target / image.name).write_bytes(image.read_bytes())


def test_commands_are_parsed_and_every_one_is_run_or_excused() -> None:
    commands = bash_commands(README.read_text())
    assert any(
        command.startswith("anomalib train --model Adfa --model.backbone tf_efficientnet_lite0") for command in commands
    )
    last_steps = [command.split(" && ")[-1] for command in commands]
    excused = {prefix for prefix in NOT_RUN if any(step.startswith(prefix) for step in last_steps)}
    assert excused == set(NOT_RUN), f"stale NOT_RUN entries: {set(NOT_RUN) - excused}"
    # Lightning's default is 1000 epochs: a README training command without a budget would run for hours.
    unbudgeted = [
        step
        for step in last_steps
        if step.startswith("anomalib train") and not re.search(r"--trainer\.max_epochs|--config|PL_TRAINER_MAX", step)
    ]
    assert unbudgeted == [], f"training commands without --trainer.max_epochs: {unbudgeted}"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    brainmri = _brainmri(home)
    (work / "datasets").mkdir()
    (work / "datasets" / "brain_tumor_dataset").symlink_to(brainmri)
    (work / "configs").symlink_to(PROJECT_ROOT / "configs")
    _own_scans(work)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),  # keep the Lite0 file
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",  # the README promises offline use
    }
    script = ["set -euo pipefail"]
    for command in bash_commands(README.read_text()):
        if _excused(command):
            continue
        shown = command.replace("'", "'\\''")
        script += [f"echo '>>> {shown}' >&2", runnable(command)]
    started = time.perf_counter()
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    failed = [line for line in result.stderr.splitlines() if line.startswith(">>> ")][-1:]
    assert result.returncode == 0, f"failed at {failed}:\n{result.stderr[-4000:]}"
    assert "image_AUROC=" in result.stdout  # the demo
    run = work / "results" / "Adfa" / "BrainMRI" / "latest"
    assert (run / "weights" / "openvino" / "model.xml").is_file()  # export landed in the run folder
    assert (run / "predictions" / "0" / "scores.csv").is_file()
    assert (run / "exported_predictions" / "scores.csv").is_file()
    assert list((work / "runs" / "benchmark").glob("*/results.csv"))
    print(f"README commands: {time.perf_counter() - started:.0f} s")
