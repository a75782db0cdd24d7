"""Where bfloat16 loses precision in an exported ADFA graph: each stage's output, f32 against forced bf16.

Compiles the OpenVINO IR twice (``INFERENCE_PRECISION_HINT`` f32 and bf16) with extra outputs at named stages and
prints ``max |bf16 - f32| / max |f32|`` per stage over the images given. The default node names are those of a
Lite0 export from ``benchmarks/decision_parity.py`` (resize, attention, KL factor, one chunk's distances, patch
scores, map, raw score, normalised score); other exports may name them otherwise (list them with
``openvino.Core().read_model(xml).get_ordered_ops()``). Run:
``python -m benchmarks.bf16_stages /tmp/parity_work/openvino/weights/openvino/model.xml /tmp/parity_work/images``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import openvino as ov
from anomalib.data.utils import read_image

STAGES = {
    "node_matmul_1": "resized image",
    "node_sigmoid": "channel attention",
    "node_sum_3": "KL factor",
    "node_matmul_2": "distances (first chunk)",
    "node_sqrt": "patch scores (sqrt)",
    "node_upsample_bilinear2d_2": "anomaly map (before blur)",
    "n0_33": "raw image score",
    "node_sigmoid_5": "normalised image score",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("xml", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--every", type=int, default=30, help="use every n-th image of the folder")
    args = parser.parse_args(argv)
    core = ov.Core()

    def compiled(precision: str) -> ov.CompiledModel:
        model = core.read_model(args.xml)
        ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        model.add_outputs([ops[name].output(0) for name in STAGES if name in ops])
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})

    f32, bf16 = compiled("f32"), compiled("bf16")
    errors: dict[str, float] = {}
    for path in sorted(args.images.iterdir())[:: args.every]:
        image = read_image(path, as_tensor=True).unsqueeze(0).numpy()
        exact, rounded = f32(image), bf16(image)
        for index, port in enumerate(f32.outputs):
            name = port.get_node().input_value(0).get_node().get_friendly_name()
            expected, got = exact[port], rounded[bf16.outputs[index]]
            if name in STAGES and expected.dtype == np.float32:
                error = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
                errors[name] = max(errors.get(name, 0.0), error)
    print("| stage | node | max relative error, bf16 vs f32 |\n|---|---|---|")
    for name, error in errors.items():
        print(f"| {STAGES[name]} | `{name}` | {error:.1e} |")


if __name__ == "__main__":
    main()
