"""Where anomaly maps meet masks: in the model input (after resize and crop) or in the image's own frame.

anomalib's :class:`~anomalib.pre_processing.PreProcessor` transforms the image and its mask together, so pixel
metrics compare the map with the mask *at the model input*: after the resize and after the centre crop. The
paper's 256 -> 224 centre crop drops a border of 16 pixels of the resized frame (12.5 % of the area), and with it
the parts of BUSI lesions that reach the image border; those lesion pixels are simply not evaluated.

:class:`FramedPreProcessor` makes that a switch, ``mask_resolution``:

- ``"input"`` (anomalib's convention, the default): maps and masks are compared at the model input size.
- ``"original"``: the mask is left in the image's frame, and after the model has run the anomaly map is put back
  into that frame: pasted into the resized frame where the crop took it from, the cropped-away border filled with
  the image's lowest map value (so lesion pixels cut off by the crop count as missed, not as ignored), then
  resized bilinearly to the image size. The batch's image is restored too, so the post-processor, the evaluator
  and the visualiser all work in the image's frame. anomalib collates a batch of differently sized images by
  resizing them all to the largest one's size, so with ``eval_batch_size=1`` this is each file's own resolution.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from anomalib.data import Batch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import LightningModule, Trainer
from torch.nn import functional as F  # noqa: N812
from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize, Transform

from anomalib_adfa.backbones import NORMALIZATIONS, backbone_normalization
from anomalib_adfa.errors import ConfigurationError
from anomalib_adfa.pre_processing import exportable_transform

MaskResolution = Literal["input", "original"]
MASK_RESOLUTIONS: tuple[str, ...] = ("input", "original")

_GEOMETRIC = (Resize, CenterCrop)
_PHOTOMETRIC = (Normalize,)


def crop_box(resized: tuple[int, int], crop: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of torchvision's centre crop of a ``resized`` frame (no crop: the frame)."""
    if crop is None:
        return 0, 0, resized[0], resized[1]
    top = round((resized[0] - crop[0]) / 2.0)
    left = round((resized[1] - crop[1]) / 2.0)
    return top, left, crop[0], crop[1]


def to_image_frame(
    maps: torch.Tensor, frame: tuple[int, int], resized: tuple[int, int], crop: tuple[int, int] | None
) -> torch.Tensor:
    """Put maps computed on the resized, centre-cropped input back into the image's frame.

    Args:
        maps: Anomaly maps at the model input, shape ``(B, 1, h, w)`` or ``(B, h, w)``.
        frame: ``(H, W)`` of the images before pre-processing.
        resized: ``(H', W')`` of the resize before the crop.
        crop: ``(h, w)`` of the centre crop, ``None`` for none.

    Returns:
        Maps of shape ``(B, 1, H, W)`` (or ``(B, H, W)``, as given); pixels outside the crop hold each map's minimum.
    """
    squeeze = maps.dim() == 3
    maps = maps[:, None] if squeeze else maps
    top, left, height, width = crop_box(resized, crop)
    if maps.shape[-2:] != (height, width):
        msg = f"anomaly maps are {tuple(maps.shape[-2:])}, not the pre-processor's output size {(height, width)}"
        raise ValueError(msg)
    floor = maps.amin(dim=(-2, -1), keepdim=True)
    full = floor.expand(-1, -1, *resized).clone()
    full[..., top : top + height, left : left + width] = maps
    framed = F.interpolate(full, size=frame, mode="bilinear", align_corners=False)
    return framed[:, 0] if squeeze else framed


class FramedPreProcessor(PreProcessor):
    """anomalib's pre-processor with a switch for the frame in which maps are compared with masks.

    Args:
        transform: ``Resize``, optionally ``CenterCrop``, and photometric steps (``Normalize``), composed.
        mask_resolution: ``"input"`` (compare at the model input, anomalib's convention) or ``"original"``
            (compare in the image's frame); see the module docstring.

    Raises:
        ValueError: For an unknown ``mask_resolution``, or ``"original"`` with a transform this class cannot invert.

    Example:
        >>> from anomalib_adfa import Adfa
        >>> model = Adfa(mask_resolution="original")  # the switch of ADFA's default pre-processor

        For anomalib's own models: ``--model.pre_processor anomalib_adfa.mask_frame.FramedPreProcessor``
        with ``--model.pre_processor.transform`` and ``--model.pre_processor.mask_resolution original``.
    """

    def __init__(self, transform: Transform | None = None, mask_resolution: MaskResolution = "input") -> None:
        if mask_resolution not in MASK_RESOLUTIONS:
            msg = f"mask_resolution must be one of {MASK_RESOLUTIONS}, got {mask_resolution!r}"
            raise ValueError(msg)
        super().__init__(transform=transform)
        self.export_transform = exportable_transform(transform)
        self.mask_resolution = mask_resolution
        self._resized, self._crop = transform_geometry(transform) if mask_resolution == "original" else (None, None)
        self._original: torch.Tensor | None = None

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore the checkpoint's transform, exported with its antialiasing (:mod:`~anomalib_adfa.pre_processing`)."""
        super().load_checkpoint_config(config)
        self.export_transform = exportable_transform(self.transform)

    def _start(self, batch: Batch) -> None:
        _check_mask_size(batch)
        if self.mask_resolution == "input" or self.transform is None:
            if self.transform is not None:
                batch.image, batch.gt_mask = self.transform(batch.image, batch.gt_mask)
            return
        self._original = batch.image
        batch.image = self.transform(batch.image)

    def _end(self, outputs: Any) -> None:
        if self._original is None:
            return
        original, self._original = self._original, None
        if getattr(outputs, "anomaly_map", None) is not None:
            frame = (original.shape[-2], original.shape[-1])
            outputs.anomaly_map = to_image_frame(outputs.anomaly_map, frame, self._resized, self._crop)
        outputs.image = original

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Batch, *args: Any) -> None:
        del trainer, pl_module, args
        self._start(batch)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Batch, *args: Any) -> None:
        del trainer, pl_module, args
        self._start(batch)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Batch, *args: Any) -> None:
        del trainer, pl_module, args
        self._start(batch)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        del trainer, pl_module, args
        self._end(outputs)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        del trainer, pl_module, args
        self._end(outputs)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        del trainer, pl_module, args
        self._end(outputs)


def _check_mask_size(batch: Batch) -> None:
    """Refuse masks whose size differs from their images' before any resize hides the mismatch."""
    mask = getattr(batch, "gt_mask", None)
    if mask is None or mask.shape[-2:] == batch.image.shape[-2:]:
        return
    paths = getattr(batch, "mask_path", None) or getattr(batch, "image_path", None) or ["?"]
    msg = (
        f"mask {paths[0]} (batch of {len(paths)}) is {mask.shape[-1]}x{mask.shape[-2]} pixels but its image is "
        f"{batch.image.shape[-1]}x{batch.image.shape[-2]}: masks must have their image's size"
    )
    raise ValueError(msg)


def transform_geometry(transform: Transform | None) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """Resize size and centre-crop size of a transform that ``"original"`` can invert."""
    steps = list(transform.transforms) if isinstance(transform, Compose) else [transform]
    resizes = [step for step in steps if isinstance(step, Resize)]
    crops = [step for step in steps if isinstance(step, CenterCrop)]
    others = [type(step).__name__ for step in steps if not isinstance(step, _GEOMETRIC + _PHOTOMETRIC)]
    if len(resizes) != 1 or len(crops) > 1 or others or len(resizes[0].size or ()) != 2:
        msg = (
            "mask_resolution='original' needs a transform of one Resize to (height, width), at most one CenterCrop "
            f"and Normalize steps, got {transform!r}"
        )
        raise ValueError(msg)
    resized = (int(resizes[0].size[0]), int(resizes[0].size[1]))
    crop = (int(crops[0].size[0]), int(crops[0].size[1])) if crops else None
    return resized, crop


def default_pre_processor(
    image_size: tuple[int, int] | None = None,
    center_crop_size: tuple[int, int] | None = (224, 224),
    normalization: str = "imagenet",
    mask_resolution: MaskResolution = "input",
) -> FramedPreProcessor:
    """Resize, centre-crop and normalise, as the public ADFA code does (256 -> 224).

    Args:
        image_size: Resize size, default ``(256, 256)``.
        center_crop_size: Crop size, or ``None`` for no crop.
        normalization: ``"imagenet"``, ``"half"`` or a timm backbone name whose own mean/std to use.
        mask_resolution: ``"input"`` or ``"original"``; see :class:`FramedPreProcessor`.

    Returns:
        The pre-processor.

    Raises:
        ConfigurationError: If the crop is larger than the image size.
    """
    image_size = tuple(image_size or (256, 256))
    mean, std = NORMALIZATIONS.get(normalization) or backbone_normalization(normalization)
    steps: list[Any] = [Resize(image_size, antialias=True)]
    if center_crop_size is not None:
        if center_crop_size[0] > image_size[0] or center_crop_size[1] > image_size[1]:
            msg = (
                f"--model.center_crop_size {tuple(center_crop_size)} is larger than --model.image_size "
                f"{image_size}; give a crop at most the image size, or null for none"
            )
            raise ConfigurationError(msg)
        steps.append(CenterCrop(tuple(center_crop_size)))
    steps.append(Normalize(mean=list(mean), std=list(std)))
    return FramedPreProcessor(transform=Compose(steps), mask_resolution=mask_resolution)
