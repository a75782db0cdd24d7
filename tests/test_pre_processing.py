"""The exported resize is the resize of training: torchvision's antialiased bilinear ``Resize``, as matrix products."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from anomalib.data.transforms import ExportableCenterCrop
from torchvision.transforms.v2 import CenterCrop, Compose, InterpolationMode, Normalize, Resize

from anomalib_adfa import Adfa
from anomalib_adfa.mask_frame import FramedPreProcessor
from anomalib_adfa.pre_processing import ExportableResize, antialiased_resize, exportable_transform, resize_weights

# (input height, input width) -> (output height, output width): down by non-integer and integer factors, up,
# unchanged, mixed (one side up, the other down), and the sizes of the real data (BUSI, Covid, SIPaKMeD).
SHAPES = [
    ((600, 450), (146, 146)),
    ((512, 512), (256, 256)),
    ((100, 120), (146, 146)),
    ((146, 146), (146, 146)),
    ((300, 301), (128, 300)),
    ((217, 180), (256, 256)),
    ((1536, 2048), (256, 256)),
]


@pytest.mark.parametrize(("shape", "size"), SHAPES)
def test_antialiased_resize_is_torchvisions_resize(shape: tuple[int, int], size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = Resize(size, antialias=True)(images)
    torch.testing.assert_close(antialiased_resize(images, size), expected, rtol=0, atol=1e-12)
    # float32: torchvision's own float32 kernel rounds its pixel coordinates; ours uses exact integers.
    torch.testing.assert_close(antialiased_resize(images.float(), size).double(), expected, rtol=0, atol=1e-6)


def test_resize_weights_average_downscaled_windows_and_interpolate_upscaled_ones() -> None:
    like = torch.zeros(())
    down = resize_weights(4, 2, like)  # each output averages two inputs with a triangle of width 4
    torch.testing.assert_close(down, torch.tensor([[3, 3, 1, 0], [0, 1, 3, 3]]) / 7.0)
    up = resize_weights(2, 4, like)  # plain bilinear, edge pixels repeated
    torch.testing.assert_close(up, torch.tensor([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1.0]]))


def test_exportable_transform_keeps_antialiasing_and_leaves_the_original_untouched() -> None:
    transform = Compose([Resize((146, 146), antialias=True), CenterCrop((128, 128)), Normalize([0.5] * 3, [0.5] * 3)])
    exported = exportable_transform(transform)
    assert [type(step) for step in exported.transforms] == [ExportableResize, ExportableCenterCrop, Normalize]
    assert exported.transforms[0].size == (146, 146)
    assert isinstance(transform.transforms[0], Resize)
    assert transform.transforms[0].antialias
    images = torch.rand(1, 3, 301, 257, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(exported(images), transform(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "resize",
    [
        Resize((64, 64), interpolation=InterpolationMode.BICUBIC, antialias=True),
        Resize(64, antialias=True),
        Resize((64, 64), antialias=False),
    ],
)
def test_a_resize_it_cannot_reproduce_is_exported_as_anomalib_does(resize: Resize) -> None:
    (step,) = exportable_transform(Compose([resize])).transforms
    assert type(step) is Resize
    assert not step.antialias


def test_adfa_pre_processor_exports_the_resize_it_trains_with() -> None:
    model = Adfa(backbone="tf_efficientnet_lite0", pre_trained=False, image_size=(72, 72), center_crop_size=(64, 64))
    pre_processor = model.pre_processor
    assert isinstance(pre_processor, FramedPreProcessor)
    images = torch.rand(1, 3, 240, 200, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(pre_processor(images), pre_processor.transform(images), rtol=0, atol=1e-5)
    # A checkpoint restores the transform; its export keeps the antialiasing too.
    pre_processor.load_checkpoint_config(pre_processor.checkpoint_config())
    assert isinstance(pre_processor.export_transform.transforms[0], ExportableResize)
    torch.testing.assert_close(pre_processor(images), pre_processor.transform(images), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def resize_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:class:`ExportableResize` to 146 x 146 exported to ONNX (opset 18) with free batch, height and width."""
    path = tmp_path_factory.mktemp("resize") / "resize.onnx"
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    torch.onnx.export(
        _Graph().eval(),
        (torch.rand(1, 3, 600, 450),),
        path,
        dynamo=True,
        opset_version=18,
        dynamic_shapes={"images": dims},
        verbose=False,
    )
    return path


class _Graph(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resize = ExportableResize((146, 146))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.resize(images)


@pytest.mark.parametrize("shape", [(1, 3, 600, 450), (2, 3, 512, 512), (1, 3, 100, 120)])
def test_exported_resize_runs_the_same_in_onnxruntime_and_openvino(resize_graph: Path, shape: tuple) -> None:
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    expected = Resize((146, 146), antialias=True)(images).numpy()
    session = ort.InferenceSession(str(resize_graph), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], expected, rtol=0, atol=2e-5)
    core = ov.Core()
    model = core.read_model(resize_graph)
    f32 = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(f32(images.numpy())[0], expected, rtol=0, atol=2e-5)
    # bfloat16 keeps about 3 significant digits of a pixel; no pixel coordinate is held in a float, so the error
    # stays at that level (coordinates in bfloat16 would be off by pixels: errors of 0.3-0.5).
    bf16 = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    assert np.abs(bf16(images.numpy())[0] - expected).max() < 2e-2
