"""The fast paths of ADFA's training step against the plain computation, and the feature cache."""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms import v2

from anomalib_adfa import Adfa
from anomalib_adfa.descriptor import concatenate_scales, coordinate_channels
from anomalib_adfa.feature_cache import FeatureCache, random_transform_reason
from anomalib_adfa.patch_scoring import DISTANCE_MODES, nearest_center_scores
from anomalib_adfa.reference import plain_scores
from anomalib_adfa.soft_topk import TOPK_MODES, TopKSettings
from anomalib_adfa.torch_model import AdfaModel

LITE0 = {"backbone": "tf_efficientnet_lite0", "layers": ("blocks.1", "blocks.2", "blocks.4"), "pre_trained": False}


def adfa_like(batch: int, patches: int, channels: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Descriptors scattered around one centre per position, as after ADFA's centre initialisation."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(patches, channels, generator=generator, dtype=dtype)
    noise = torch.randn(batch, patches, channels, generator=generator, dtype=dtype)
    return (
        (centers + 0.5 * noise).requires_grad_(),
        centers,
        torch.randn(batch, patches, generator=generator, dtype=dtype),
    )


def values_and_grads(scores: torch.Tensor, patches: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    (grad,) = torch.autograd.grad(scores, patches, upstream)
    return scores.detach(), grad


@pytest.mark.parametrize("distance", DISTANCE_MODES)
@pytest.mark.parametrize("mode", TOPK_MODES)
def test_fused_scores_match_plain_float64(mode: str, distance: str) -> None:
    patches, centers, upstream = adfa_like(3, 49, 12, torch.float64, seed=0)
    topk = TopKSettings(3, mode, num_iterations=40)
    plain = values_and_grads(plain_scores(patches, centers, distance, topk), patches, upstream)
    # 500 elements per chunk: 3 patch rows of the 3 images, so 17 chunks with a short last one.
    fused_scores = nearest_center_scores(patches, centers, distance, topk, chunk_elements=500)
    fused = values_and_grads(fused_scores, patches, upstream)
    for ours, reference in zip(fused, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", TOPK_MODES)
def test_fused_scores_match_plain_float32_with_early_exit(mode: str) -> None:
    patches, centers, upstream = adfa_like(2, 196, 32, torch.float32, seed=1)
    topk = TopKSettings(3, mode)
    plain = values_and_grads(plain_scores(patches, centers, "kl_weighted", topk), patches, upstream)
    fused = values_and_grads(nearest_center_scores(patches, centers, "kl_weighted", topk), patches, upstream)
    for ours, reference in zip(fused, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=2e-4, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("mode", TOPK_MODES)
def test_chunked_equals_unchunked(mode: str) -> None:
    patches, centers, upstream = adfa_like(2, 36, 8, torch.float64, seed=2)
    distance, topk = "kl_weighted", TopKSettings(3, mode, num_iterations=40)
    row_by_row = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 1), patches, upstream)
    whole = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 10**9), patches, upstream)
    for ours, reference in zip(row_by_row, whole, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_fused_scores_without_gradient_match_and_patch_on_its_centre() -> None:
    patches, centers, upstream = adfa_like(2, 25, 6, torch.float64, seed=3)
    with torch.no_grad():
        patches[0, 4] = centers[4]  # a zero distance: the clamp at 0 is active for rounding errors
    topk, distance = TopKSettings(3, "reference", num_iterations=40), "squared"
    plain = values_and_grads(plain_scores(patches, centers, "squared", topk), patches, upstream)
    fused = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 50), patches, upstream)
    with torch.no_grad():
        inference = nearest_center_scores(patches, centers, distance, topk, 50)
    for ours, reference in zip((*fused, inference), (*plain, plain[0]), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_fused_scores_refuse_trainable_centres() -> None:
    patches, centers, _ = adfa_like(1, 9, 4, torch.float64, seed=4)
    with pytest.raises(ValueError, match="centre bank as constant"):
        nearest_center_scores(patches, centers.requires_grad_(), "kl_weighted", TopKSettings())


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


@pytest.mark.parametrize("mode", TOPK_MODES)
def test_model_patch_scores_use_the_exact_loss(mode: str) -> None:
    torch.manual_seed(1)
    model = AdfaModel(**LITE0, topk_mode=mode).double()
    features = model.extract_features(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    with torch.no_grad():
        model.set_centers(model.describe(features).mean(dim=0).flatten(1).T)
    descriptors = model.describe(features)
    patches = descriptors.flatten(2).transpose(1, 2)
    expected = plain_scores(patches, model.centers, "kl_weighted", model.scorer.topk).mean()
    loss = model.patch_scores(descriptors).mean()
    parameters = list(model.descriptor.parameters())
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    grads = torch.autograd.grad(loss, parameters, retain_graph=True)  # the two losses share the descriptor graph
    for ours, reference in zip(grads, torch.autograd.grad(expected, parameters), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------------------------- feature cache
def batch_features(batch: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 6, 4, 4, generator=generator)]


def entry_bytes(features: list[torch.Tensor], dtype: torch.dtype = torch.float16) -> int:
    return sum(feature[0].numel() for feature in features) * torch.finfo(dtype).bits // 8


def test_cache_round_trip_hit_rate_and_rebinding() -> None:
    cache = FeatureCache()
    cache.bind("a")
    features = batch_features(3, seed=0)
    keys = ["x", "y", "z"]
    assert cache.get(keys, torch.device("cpu"), torch.float32) is None
    cache.put(keys, features)
    restored = cache.get(["z", "x"], torch.device("cpu"), torch.float32)
    for ours, reference in zip(restored, features, strict=True):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, reference[[2, 0]], rtol=1e-3, atol=1e-3)  # stored in half precision
    assert cache.get(["x", "unknown"], torch.device("cpu"), torch.float32) is None
    assert cache.hits == 2
    assert cache.misses == 5
    assert cache.hit_rate == pytest.approx(2 / 7)
    cache.reset_counters()
    assert cache.hit_rate == 0.0
    assert len(cache) == 3
    cache.bind("a")
    assert len(cache) == 3  # same fingerprint: kept
    cache.bind("b")
    assert len(cache) == 0  # another backbone, weights, layers or pre-processing: stale, dropped
    assert cache.get(["x"], torch.device("cpu"), torch.float32) is None


def test_cache_spills_beyond_the_memory_budget_and_cleans_up(tmp_path: Path) -> None:
    features = batch_features(4, seed=1)
    size = entry_bytes(features)
    cache = FeatureCache(max_bytes=2 * size, max_disk_bytes=size, spill_dir=tmp_path)
    cache.bind("a")
    cache.put(["0", "1", "2", "3"], features)
    assert (len(cache), cache.nbytes, cache.num_on_disk, cache.disk_nbytes) == (3, 2 * size, 1, size)
    spill_dirs = list(tmp_path.iterdir())
    assert len(spill_dirs) == 1
    assert len(list(spill_dirs[0].iterdir())) == 1
    restored = cache.get(["2", "0"], torch.device("cpu"), torch.float32)  # one from disk, one from memory
    for ours, reference in zip(restored, features, strict=True):
        torch.testing.assert_close(ours, reference[[2, 0]], rtol=1e-3, atol=1e-3)
    assert cache.get(["3"], torch.device("cpu"), torch.float32) is None  # over both budgets: recomputed
    cache.bind("b")
    assert not spill_dirs[0].exists()


def test_cache_without_disk_only_keeps_the_memory_budget() -> None:
    features = batch_features(3, seed=2)
    cache = FeatureCache(max_bytes=entry_bytes(features), max_disk_bytes=0)
    cache.put(["0", "1", "2"], features)
    assert (len(cache), cache.num_on_disk) == (1, 0)


def test_disabled_cache_serves_and_stores_nothing(caplog: pytest.LogCaptureFixture) -> None:
    cache = FeatureCache()
    cache.put(["x"], batch_features(1, seed=3))
    with caplog.at_level(logging.WARNING):
        cache.disable("random crops")
    assert "random crops" in caplog.text
    cache.put(["y"], batch_features(1, seed=3))
    assert len(cache) == 0
    assert cache.get(["x"], torch.device("cpu"), torch.float32) is None
    cache.enable()
    cache.put(["y"], batch_features(1, seed=3))
    assert len(cache) == 1


def test_random_transform_reason() -> None:
    deterministic = v2.Compose(
        [v2.Resize((64, 64)), v2.CenterCrop(56), v2.ToDtype(torch.float32), v2.Normalize([0.5], [0.5])]
    )
    assert random_transform_reason(None) is None
    assert random_transform_reason(deterministic) is None
    random = v2.Compose([v2.Resize((64, 64)), v2.Compose([v2.RandomHorizontalFlip()])])
    assert "RandomHorizontalFlip" in random_transform_reason(random)


def small_adfa(**kwargs: object) -> Adfa:
    return Adfa(**{**LITE0, "image_size": (72, 72), "center_crop_size": (64, 64), **kwargs})


def test_fingerprint_tracks_backbone_layers_and_pre_processing() -> None:
    reference = small_adfa()._feature_fingerprint()
    assert small_adfa()._feature_fingerprint() == reference
    assert small_adfa(image_size=(80, 80))._feature_fingerprint() != reference
    assert small_adfa(input_normalization="imagenet")._feature_fingerprint() != reference
    assert small_adfa(layers=("blocks.1", "blocks.2", "blocks.6"))._feature_fingerprint() != reference


@pytest.mark.parametrize(("augmentations", "cached"), [(v2.Resize((64, 64)), True), (v2.RandomVerticalFlip(), False)])
def test_train_start_disables_the_cache_for_random_augmentations(
    augmentations: v2.Transform, cached: bool, caplog: pytest.LogCaptureFixture
) -> None:
    model = small_adfa()
    model.model.set_centers(torch.zeros(64, model.model.descriptor_channels))  # skip the centre pass
    dataset = SimpleNamespace(augmentations=augmentations)
    model.trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=dataset))
    with caplog.at_level(logging.WARNING):
        model.on_train_start()
    assert model.feature_cache.enabled is cached
    assert ("RandomVerticalFlip" in caplog.text) is not cached
    assert (model.feature_cache.fingerprint == model._feature_fingerprint()) is cached
