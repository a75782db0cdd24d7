"""The patch descriptor: coordinates, channel attention, the factorised projection."""

import pytest
import torch

from anomalib_adfa.descriptor import (
    ChannelAttention,
    PatchDescriptor,
    concatenate_scales,
    coordinate_channels,
    eca_kernel_size,
)
from anomalib_adfa.torch_model import AdfaModel

LITE0 = {"backbone": "tf_efficientnet_lite0", "pre_trained": False}


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


def test_decomposed_projection_equals_concatenated_projection() -> None:
    torch.manual_seed(0)
    model = AdfaModel(**LITE0).double()
    features = model.extract_features(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert len({feature.shape[-1] for feature in features}) == 3  # three resolutions, two of them resized
    stacked = concatenate_scales(features)
    coordinates = coordinate_channels(2, *stacked.shape[-2:], stacked)
    decomposed = model.describe(features)
    concatenated = model.descriptor.attend(model.descriptor.projection(torch.cat([stacked, coordinates], dim=1)))
    torch.testing.assert_close(decomposed, concatenated, rtol=1e-12, atol=1e-12)
    weight = model.descriptor.projection.weight
    upstream = torch.randn_like(decomposed)
    (grad_decomposed,) = torch.autograd.grad(decomposed, weight, upstream)
    (grad_concatenated,) = torch.autograd.grad(concatenated, weight, upstream)
    torch.testing.assert_close(grad_decomposed, grad_concatenated, rtol=1e-10, atol=1e-10)
