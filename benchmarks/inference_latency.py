"""Per-image inference latency of ADFA in PyTorch and in OpenVINO on this machine's CPU.

Each backbone is built with random weights and a random centre bank (latency does not depend on
the values), exported with anomalib's exporter (``to_openvino``: pre-processor, ADFA and
post-processor in one graph) and timed on random ``--input-size`` images at batch sizes 1 and 8.
OpenVINO runs three ways: ADFA's default export (every operation marked to keep float32, so the CPU
plugin's default precision does not apply) compiled with no config, as anomalib's inferencers do; the
explicit ``inference_precision="bf16"`` export compiled with no config (the runtime's default: bfloat16
on CPUs with AVX512-BF16 or AMX, float32 otherwise); and that export compiled with
``INFERENCE_PRECISION_HINT=bf16`` (bfloat16 everywhere; emulated, so slow, on CPUs without bfloat16).
Each row also gives the largest relative change of the image scores against PyTorch on the same inputs.

Usage::

    python benchmarks/inference_latency.py [--backbones wr50 lite0] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import torch

from anomalib_adfa import Adfa
from anomalib_adfa.weights import LITE0_BACKBONE
from benchmarks.machine import cpu_model

BACKBONES = {
    "wr50": {"backbone": "wide_resnet50_2"},
    "lite0": {"backbone": LITE0_BACKBONE},
}
BATCH_SIZES = (1, 8)


def build_model(name: str) -> Adfa:
    """ADFA at the paper's resolution (256 px resized, 224 px crop) with random weights and centres."""
    torch.manual_seed(0)
    model = Adfa(**BACKBONES[name], pre_trained=False, image_size=(256, 256), center_crop_size=(224, 224)).eval()
    with torch.no_grad():
        features = model.model.extract_features(torch.zeros(1, 3, 224, 224))
        grid = model.model.describe(features).shape[-2:]
    model.model.set_centers(torch.randn(grid[0] * grid[1], model.model.descriptor_channels))
    return model


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) of ``run``, after one warm-up call.

    On a machine shared with other jobs the wall time includes waiting for a core; the CPU time does
    not, so ``cpu / threads`` approximates the wall time of an idle machine.
    """
    run()
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu)


def measure(
    name: str, input_size: int, repeats: int, export_root: Path
) -> list[tuple[str, str, int, float, float, float]]:
    """Per-image wall and CPU milliseconds of every runtime and batch size for one backbone."""
    model = build_model(name)
    start = time.perf_counter()
    pinned = model.to_openvino(export_root / name / "f32")
    free = model.to_openvino(export_root / name / "bf16", ov_kwargs={"inference_precision": "bf16"})
    print(f"{name}: exported to OpenVINO twice in {time.perf_counter() - start:.0f} s", flush=True)
    core = ov.Core()
    runtimes: dict[str, Callable[[np.ndarray], object]] = {}
    for label, path, config in (
        ("openvino, default export", pinned, {}),
        ("openvino, bf16 export", free, {}),
        ("openvino, bf16 export + bf16 hint", free, {"INFERENCE_PRECISION_HINT": "bf16"}),
    ):
        compiled = core.compile_model(core.read_model(path), "CPU", config)
        runtimes[f"{label} ({compiled.get_property('INFERENCE_PRECISION_HINT')})"] = compiled

    def torch_run(images: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).pred_score

    def scores(label: str, output: object) -> np.ndarray:
        if label == "torch":
            return np.asarray(output)
        return next(value for port, value in output.items() if "pred_score" in port.names)

    rows = []
    for batch_size in BATCH_SIZES:
        images = np.random.default_rng(0).random((batch_size, 3, input_size, input_size), dtype=np.float32)
        reference = scores("torch", torch_run(images))
        for label, run in (("torch", torch_run), *runtimes.items()):
            change = float(np.abs(scores(label, run(images)) - reference).max() / np.abs(reference).max())
            wall, cpu = median_seconds(lambda run=run, images=images: run(images), repeats)
            rows.append((name, label, batch_size, 1000 * wall / batch_size, 1000 * cpu / batch_size, change))
            print(
                f"{name:>6} {label:>44} batch {batch_size}: {rows[-1][3]:8.1f} ms/image wall, "
                f"{rows[-1][4]:8.1f} ms/image CPU, score change {change:.1e}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", choices=sorted(BACKBONES), default=["wr50", "lite0"])
    parser.add_argument("--input-size", type=int, default=256, help="side of the random input images (pixels)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per setting (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"CPU: {cpu_model()}, torch {torch.__version__}, torch threads: {torch.get_num_threads()}, "
        f"OpenVINO {ov.get_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for name in args.backbones for row in measure(name, args.input_size, args.repeats, Path(folder))]
    print(
        "\n| backbone | runtime | batch | wall ms / image | CPU ms / image | score change vs torch |"
        "\n|---|---|---|---|---|---|"
    )
    for name, label, batch_size, wall, cpu, change in rows:
        print(f"| {name} | {label} | {batch_size} | {wall:.1f} | {cpu:.1f} | {change:.1e} |")


if __name__ == "__main__":
    main()
