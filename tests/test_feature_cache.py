"""The cache of frozen-backbone features: budgets, spilling, fingerprints, random transforms."""

import logging
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from anomalib_adfa.feature_cache import FeatureCache, random_transform_reason


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
