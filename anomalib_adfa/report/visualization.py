"""Heatmap overlays drawn over the image as our reader sees it, for DICOM and 16-bit inputs too.

anomalib's :class:`~anomalib.visualization.ImageVisualizer` re-opens each input with PIL to draw the overlay
and saves it under the input's own file name: a DICOM file cannot be opened that way, ``scan.dcm`` (or an
extension-less PACS file) cannot be written, and a 16-bit PNG is clipped to 255 by PIL's RGB conversion.
:class:`MedicalImageVisualizer` is anomalib's visualiser with the image read by
:func:`~anomalib_adfa.data.image.load_image` (with the datamodule's DICOM window options, when it has
them) and overlays of inputs PIL cannot write saved as ``<name>.png``::

    anomalib predict --model Adfa ... --model.visualizer anomalib_adfa.report.visualization.MedicalImageVisualizer
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer
from anomalib.visualization.image.item_visualizer import visualize_image_item
from PIL import Image

from anomalib_adfa.data.image import load_image
from anomalib_adfa.outputs import prediction_folder

if TYPE_CHECKING:
    from anomalib.data import ImageBatch, ImageItem
    from anomalib.models import AnomalibModule
    from lightning.pytorch import Trainer

    from anomalib_adfa.data.dicom import ReadOptions


def writable_name(path: str) -> str:
    """Return ``path`` when PIL can save to its extension, else ``path + ".png"``."""
    image_format = Image.registered_extensions().get(Path(path).suffix.lower())
    return path if image_format in Image.SAVE else f"{path}.png"


def _as_read(item: ImageItem, options: ReadOptions | None) -> ImageItem:
    """Copy the item with its full-resolution image from our reader and no path, so anomalib draws that image."""
    shown = copy.copy(item)
    shown.image = load_image(item.image_path, options)
    shown.image_path = None
    return shown


class MedicalImageVisualizer(ImageVisualizer):
    """anomalib's image visualiser, reading images with the project's reader and writing PNG where needed.

    Without an ``output_dir``, test images go to ``<default_root_dir>/images`` as in anomalib, and predictions to
    ``<run of the checkpoint>/predictions/<n>/images`` (:func:`~anomalib_adfa.outputs.prediction_folder`).
    """

    def on_predict_start(self, trainer: Trainer, pl_module: AnomalibModule) -> None:
        del pl_module
        if self.output_dir is None or getattr(self, "_chosen_output_dir", None) == self.output_dir:
            self.output_dir = self._chosen_output_dir = prediction_folder(trainer) / "images"

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: AnomalibModule,
        outputs: ImageBatch,
        batch: ImageBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        del pl_module, outputs, batch_idx, dataloader_idx
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        datamodule = getattr(trainer, "datamodule", None)
        options = getattr(datamodule, "read_options", None)
        for item in batch:
            image = visualize_image_item(
                item if item.image_path is None else _as_read(item, options),
                fields=self.fields,
                overlay_fields=self.overlay_fields,
                field_size=self.field_size,
                fields_config=self.fields_config,
                overlay_fields_config=self.overlay_fields_config,
                text_config=self.text_config,
            )
            if image is None:
                continue
            filename = generate_output_filename(
                input_path=writable_name(item.image_path or ""),
                output_path=self.output_dir,
                dataset_name=getattr(datamodule, "name", None),
                category=getattr(datamodule, "category", None),
            )
            image.save(filename)
