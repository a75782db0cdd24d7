"""The mask-resolution switch: maps put back where the crop took them from, masks left in the image frame."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch
from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, RandomHorizontalFlip, Resize

from anomalib_adfa import Adfa
from anomalib_adfa.mask_frame import FramedPreProcessor, crop_box, to_image_frame


def test_crop_box_is_torchvisions_centre_crop() -> None:
    frame = torch.arange(10 * 12).reshape(1, 10, 12)
    top, left, height, width = crop_box((10, 12), (6, 7))
    assert torch.equal(CenterCrop((6, 7))(frame), frame[:, top : top + height, left : left + width])


def test_maps_go_back_to_where_the_crop_took_them_from() -> None:
    # Frame 20x40 resized to 10x10 (each resized pixel covers 2x4 frame pixels), centre crop 6x6 at (2, 2).
    maps = torch.full((1, 1, 6, 6), 5.0)
    maps[0, 0, 5, 5] = 1.0  # the map's minimum fills the border the crop dropped
    framed = to_image_frame(maps, frame=(20, 40), resized=(10, 10), crop=(6, 6))
    assert framed.shape == (1, 1, 20, 40)
    # The crop is frame rows 4..16 and columns 8..32; away from its edges and from the 1.0 all is 5.
    inside = framed[0, 0, 6:13, 12:27]
    assert torch.allclose(inside, torch.full_like(inside, 5.0))
    assert torch.all(framed[0, 0, :3] == 1.0)
    assert torch.all(framed[0, 0, :, :6] == 1.0)


def test_original_resolution_keeps_masks_and_restores_the_image() -> None:
    transform = Compose([Resize((16, 16)), CenterCrop((12, 12)), Normalize([0.5] * 3, [0.5] * 3)])
    pre_processor = FramedPreProcessor(transform, mask_resolution="original")
    image = torch.rand(2, 3, 24, 32)
    mask = torch.zeros(2, 24, 32, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True  # a lesion in the corner, outside the crop
    batch = ImageBatch(image=image.clone(), gt_mask=mask.clone(), gt_label=torch.tensor([1, 1]))
    pre_processor.on_test_batch_start(None, None, batch, 0)
    assert batch.image.shape == (2, 3, 12, 12)
    assert torch.equal(batch.gt_mask, mask)
    batch.update(anomaly_map=torch.rand(2, 1, 12, 12), pred_score=torch.rand(2))
    pre_processor.on_test_batch_end(None, None, batch, batch, 0)
    assert torch.equal(batch.image, image)
    assert batch.anomaly_map.shape[-2:] == (24, 32)


def test_input_resolution_transforms_masks_like_anomalib() -> None:
    pre_processor = Adfa.configure_pre_processor(image_size=(16, 16), center_crop_size=(12, 12))
    assert pre_processor.mask_resolution == "input"
    batch = ImageBatch(image=torch.rand(1, 3, 24, 32), gt_mask=torch.zeros(1, 24, 32, dtype=torch.bool))
    pre_processor.on_test_batch_start(None, None, batch, 0)
    assert batch.gt_mask.shape[-2:] == (12, 12)


def test_a_mask_of_another_size_is_refused_naming_the_file() -> None:
    pre_processor = Adfa.configure_pre_processor(image_size=(16, 16), center_crop_size=None)
    batch = ImageBatch(
        image=torch.rand(1, 3, 24, 32),
        gt_mask=torch.zeros(1, 20, 20, dtype=torch.bool),
        mask_path=["masks/lesion_007.png"],
    )
    with pytest.raises(ValueError, match=r"lesion_007\.png.*20x20 pixels but its image is 32x24"):
        pre_processor.on_test_batch_start(None, None, batch, 0)


def test_bad_switch_values_and_uninvertible_transforms_are_refused() -> None:
    with pytest.raises(ValueError, match="mask_resolution must be one of"):
        FramedPreProcessor(Resize((8, 8)), mask_resolution="native")
    with pytest.raises(ValueError, match="RandomHorizontalFlip"):
        FramedPreProcessor(Compose([Resize((8, 8)), RandomHorizontalFlip()]), mask_resolution="original")
