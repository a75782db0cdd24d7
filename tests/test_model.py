"""Components of the ADFA torch model: descriptor, attention, distances, centre bank, scores."""

import pytest
import torch
from anomalib.data import InferenceBatch
from torch.nn import functional as F  # noqa: N812

from anomalib_adfa import AdfaModel
from anomalib_adfa.descriptor import (
    ChannelAttention,
    PatchDescriptor,
    concatenate_scales,
    coordinate_channels,
    eca_kernel_size,
)
from anomalib_adfa.patch_scoring import kl_weight
from anomalib_adfa.reference import plain_distances, squared_distances
from anomalib_adfa.torch_model import CentersNotInitializedError

LITE0 = {"backbone": "tf_efficientnet_lite0", "layers": ("blocks.1", "blocks.2", "blocks.4"), "pre_trained": False}


def test_coordinates_span_minus_one_to_one_by_row_then_column() -> None:
    coords = coordinate_channels(2, 4, 3, torch.zeros(1))
    assert coords.shape == (2, 2, 4, 3)
    torch.testing.assert_close(coords[0, 0, :, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    torch.testing.assert_close(coords[0, 1, 0, :], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.all(coords[:, 0].diff(dim=2) == 0)
    assert torch.all(coords[:, 1].diff(dim=1) == 0)


def test_attention_kernel_rule() -> None:
    assert eca_kernel_size(448) == 5
    assert eca_kernel_size(44) == 3
    assert PatchDescriptor(16, 448, attention_kernel="eca").attention.conv.kernel_size == (5,)
    assert PatchDescriptor(16, 448).attention.conv.kernel_size == (9,)
    with pytest.raises(ValueError, match="odd"):
        ChannelAttention(8, 4)


def test_attention_uses_max_and_mean_pooling_through_one_shared_conv() -> None:
    attention = ChannelAttention(6, 3)
    features = torch.randn(2, 6, 5, 5)
    conv = attention.conv
    expected = torch.sigmoid(
        conv(features.amax(dim=(2, 3)).unsqueeze(1)) + conv(features.mean(dim=(2, 3)).unsqueeze(1))
    ).view(2, 6, 1, 1)
    torch.testing.assert_close(attention(features), expected)


def test_descriptor_refines_with_attention_and_can_switch_it_off() -> None:
    torch.manual_seed(0)
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 4, 4, 4)]
    descriptor = PatchDescriptor(12, 3, attention_eps=0.1)
    stacked = concatenate_scales(features)
    assert stacked.shape == (2, 12, 8, 8)
    plain = descriptor.projection(torch.cat([stacked, coordinate_channels(2, 8, 8, stacked)], dim=1))
    torch.testing.assert_close(descriptor(features), plain + 0.1 * descriptor.attention(plain) * plain)
    descriptor.attention_eps = 0.0
    torch.testing.assert_close(descriptor(features), plain)


def test_wide_resnet_dimensions_match_the_paper() -> None:
    model = AdfaModel(pre_trained=False)
    features = model.extract_features(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14)]
    descriptors = model.describe(features)
    assert descriptors.shape == (1, 448, 56, 56)
    assert model.descriptor.projection.in_channels == 1792 + 2


def test_distance_modes() -> None:
    patches, centers = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    expected = torch.cdist(patches, centers.expand(2, -1, -1)).square()
    torch.testing.assert_close(squared_distances(patches, centers), expected)
    torch.testing.assert_close(plain_distances(patches, centers, "euclidean"), expected.sqrt(), atol=1e-6, rtol=0)
    kl = F.kl_div(patches.log_softmax(-1), centers.softmax(-1).expand(2, -1, -1), reduction="none").sum(dim=(1, 2))
    torch.testing.assert_close(kl_weight(patches, centers).view(2), kl)
    torch.testing.assert_close(plain_distances(patches, centers, "kl_weighted"), expected * kl.view(2, 1, 1))
    with pytest.raises(ValueError, match="distance must be one of"):
        plain_distances(patches, centers, "cosine")  # type: ignore[arg-type]


def test_scores_need_a_centre_bank_of_the_right_shape() -> None:
    model = AdfaModel(**LITE0).eval()
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(CentersNotInitializedError, match="train the model"):
        model(images)
    with pytest.raises(ValueError, match="centre bank must have shape"):
        model.set_centers(torch.zeros(256, 7))
    model.set_centers(torch.zeros(100, model.descriptor_channels))
    with pytest.raises(ValueError, match="input size the model was trained with"):
        model(images)


@pytest.mark.parametrize("mode", ["reference", "sharp", "hard"])
def test_eval_forward_returns_an_inference_batch(mode: str) -> None:
    torch.manual_seed(0)
    # float64: the backbone's float32 convolutions round differently for different batch sizes.
    model = AdfaModel(**LITE0, topk_mode=mode).eval().double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    descriptors = model.describe(model.extract_features(images))
    model.set_centers(descriptors.mean(0).flatten(1).T)
    output = model(images)
    assert isinstance(output, InferenceBatch)
    assert output.anomaly_map.shape == (3, 1, 32, 32)
    torch.testing.assert_close(output.pred_score, output.anomaly_map.amax(dim=(1, 2, 3)))
    # Each image scores the same alone as in the batch.
    alone = torch.cat([model(image[None]).pred_score for image in images])
    torch.testing.assert_close(alone, output.pred_score, rtol=1e-6, atol=0)


def test_training_forward_returns_differentiable_patch_scores_and_keeps_backbone_frozen() -> None:
    model = AdfaModel(**LITE0)
    images = torch.randn(2, 3, 64, 64)
    model.set_centers(model.describe(model.extract_features(images)).mean(0).flatten(1).T)
    model.train()
    assert not model.feature_extractor.training
    scores = model(images)
    assert scores.shape == (2, 16 * 16)
    scores.mean().backward()
    assert model.descriptor.projection.weight.grad is not None
    assert all(p.grad is None for p in model.feature_extractor.parameters())


def test_same_seed_same_model() -> None:
    images = torch.randn(1, 3, 64, 64)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = AdfaModel(**LITE0)
        outputs.append(model.describe(model.extract_features(images)))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
