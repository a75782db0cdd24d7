"""One resize on every path: the antialiased bilinear resize of training, written so that it exports.

ADFA's pre-processor resizes with torchvision's ``Resize(antialias=True)``: anomalib's datamodules apply it to
each image before collating (fit, validate, test, checkpoint predict), so an image's input tensor does not
depend on its batch mates. anomalib exports a pre-processor through
:func:`~anomalib.pre_processing.utils.transform.get_exportable_transform`, which *switches antialiasing off*
because PyTorch's antialiased kernel has no portable export: ONNX opset 18 ``Resize`` has an ``antialias``
attribute and ONNX Runtime honours it, but OpenVINO 2026.4's ONNX frontend does not (measured: pixel errors of
0.5 on a 600 x 450 -> 146 x 146 downscale). The exported model therefore saw other pixels than the model that
was validated, whenever an image's size differed from the model's input size, which is always the case for
images as a clinic sends them.

Here the exported graph computes the same antialiased resize as two matrix products, which every runtime
executes exactly (:func:`antialiased_resize`). The resize used in training stays torchvision's kernel: it is the
reference this module is tested against (to float rounding), and it keeps the checkpoint's serialisable
transform anomalib's own. :func:`exportable_transform` is anomalib's ``get_exportable_transform`` with this one
replacement instead of switching antialiasing off.

**The filter.** For an input length ``n`` and output length ``m``, let ``s = n / m``. Output sample ``i`` sits
at input coordinate ``c_i = s (i + 1/2)`` (half-pixel centres, ``align_corners=False``); input pixel ``j`` sits
at ``j + 1/2``. The bilinear (triangle) filter stretched by ``f = max(s, 1)`` gives the weights

    w_ij = max(0, 1 - |j + 1/2 - c_i| / f),    W_ij = w_ij / sum_j w_ij,

so downscaling (``s > 1``) averages over a window of ``2 s`` input pixels (the antialiasing), and upscaling is
ordinary bilinear interpolation with the edge pixel repeated. This is the filter of PIL and of PyTorch's
``interpolate(..., antialias=True)``: PyTorch restricts ``j`` to a window ``[floor(c_i - f + 1/2),
floor(c_i + f + 1/2))`` clamped to ``[0, n)``, outside of which ``w_ij`` is already 0, so the restriction only
removes zero terms. The resize is separable: ``Y = W_rows X W_cols^T`` for each image channel ``X``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from anomalib.pre_processing.utils.transform import convert_center_crop_transform
from torchvision.transforms.v2 import Compose, InterpolationMode, Resize, Transform


def resize_weights(input_size: int, output_size: int, like: torch.Tensor) -> torch.Tensor:
    """Row-normalised weights ``W`` of the antialiased bilinear resize along one axis (module docstring).

    Args:
        input_size: ``n``, the input length (may be symbolic while exporting).
        output_size: ``m``, the output length.
        like: Tensor whose dtype and device the weights take.

    Returns:
        Weights of shape ``(m, n)``; each row sums to 1.
    """
    # 2 m f w_ij's offset, 2 m (j + 1/2 - c_i) = (2 j + 1) m - (2 i + 1) n, is an exact integer; dividing it by
    # 2 m f = 2 max(n, m) gives the offset in filter units. No float ever holds a pixel coordinate, which
    # bfloat16 (OpenVINO's default on CPUs that have it) resolves only to 2-4 pixels at n = 600.
    input_index = torch.arange(input_size, device=like.device)
    output_index = torch.arange(output_size, device=like.device)
    input_length = input_index[-1:] + 1  # n as a tensor: n may be a symbolic size while exporting
    offsets = (2 * input_index[None, :] + 1) * output_size - (2 * output_index[:, None] + 1) * input_length
    support = 2 * input_length.clamp(min=output_size)
    weights = (1.0 - offsets.abs().to(like.dtype) / support.to(like.dtype)).clamp(min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def antialiased_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize as two matrix products: torchvision's ``Resize(antialias=True)``, exportable.

    Args:
        images: Images of shape ``(..., H, W)``.
        size: ``(h, w)`` of the output.

    Returns:
        Resized images of shape ``(..., h, w)``.
    """
    rows = resize_weights(images.shape[-2], size[0], images)  # (h, H)
    columns = resize_weights(images.shape[-1], size[1], images)  # (w, W)
    return rows @ images @ columns.T


class ExportableResize(Transform):
    """The exported form of ``Resize(size, antialias=True)`` (bilinear): :func:`antialiased_resize`.

    Like anomalib's ``ExportableCenterCrop`` for ``CenterCrop``, it runs only inside the exported model
    (``PreProcessor.forward``); training and evaluation use torchvision's ``Resize``.

    Args:
        size: ``(height, width)`` of the output.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def transform(self, inpt: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        """Resize an image batch ``(B, C, H, W)`` to ``(B, C, h, w)``."""
        del params
        return antialiased_resize(inpt, self.size)


def exportable_transform(transform: Transform | None) -> Transform | None:
    """Make a transform exportable as anomalib does, but keep its antialiasing instead of switching it off.

    A copy of ``transform`` in which each antialiased bilinear ``Resize`` to a ``(height, width)`` becomes an
    :class:`ExportableResize` and each ``CenterCrop`` anomalib's ``ExportableCenterCrop``. A ``Resize`` that
    this module cannot reproduce (another interpolation, a single side length, ``max_size``) has its
    antialiasing switched off, as anomalib does.

    Args:
        transform: The pre-processor's transform, or ``None``.

    Returns:
        The transform for the exported graph, or ``None``.
    """
    if transform is None:
        return None
    return convert_center_crop_transform(_replace_resizes(copy.deepcopy(transform)))


def _replace_resizes(transform: Transform) -> Transform:
    if isinstance(transform, Compose):
        transform.transforms = [_replace_resizes(step) for step in transform.transforms]
        return transform
    if not isinstance(transform, Resize):
        return transform
    reproducible = (
        transform.antialias
        and InterpolationMode(transform.interpolation) == InterpolationMode.BILINEAR
        and transform.max_size is None
        and len(transform.size or ()) == 2
    )
    if reproducible:
        return ExportableResize(tuple(transform.size))
    transform.antialias = False
    return transform
