"""The centre bank: every training image counted once, over all ranks, without a DistributedSampler's padding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from anomalib_adfa.centers import distinct_shard_batches, mean_training_descriptor

SEED = 0


@pytest.mark.parametrize(("num_images", "world_size", "batch_size"), [(9, 2, 2), (10, 4, 3), (5, 3, 4), (2, 3, 1)])
def test_centre_pass_drops_sampler_padding(num_images: int, world_size: int, batch_size: int) -> None:
    paths = [f"image_{index}.png" for index in range(num_images)]

    def collate(indices: list[int]) -> SimpleNamespace:
        return SimpleNamespace(image=torch.tensor(indices), image_path=[paths[index] for index in indices])

    seen: list[str] = []
    for rank in range(world_size):
        sampler = DistributedSampler(range(num_images), num_replicas=world_size, rank=rank, shuffle=True, seed=SEED)
        loader = DataLoader(range(num_images), batch_size=batch_size, sampler=sampler, collate_fn=collate)
        for images, batch_paths in distinct_shard_batches(loader):
            assert batch_paths == [paths[index] for index in images.tolist()]
            seen += batch_paths
    assert sorted(seen) == sorted(paths)


class _RecordingStrategy:
    """One rank's view of ``reduce``: records what the rank contributes and returns it unchanged."""

    def __init__(self) -> None:
        self.contributed: list[torch.Tensor] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        self.contributed.append(tensor.clone())
        return tensor


def test_summed_rank_contributions_give_the_mean_of_every_image_once() -> None:
    images = torch.randn(7, 2, 3, 3, generator=torch.Generator().manual_seed(0))  # (N, D', H, W) descriptors
    totals = torch.zeros(2, 3, 3, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for rank in range(3):  # 7 images on 3 ranks: two padding copies
        sampler = DistributedSampler(range(7), num_replicas=3, rank=rank, shuffle=True, seed=SEED)
        loader = DataLoader(
            range(7), batch_size=2, sampler=sampler, collate_fn=lambda i: SimpleNamespace(image=images[i])
        )
        strategy = _RecordingStrategy()
        mean_training_descriptor(lambda batch, paths: batch, loader, strategy, torch.device("cpu"))
        totals += strategy.contributed[0]
        count += strategy.contributed[1]
    expected = images.double().mean(dim=0).flatten(1).T
    torch.testing.assert_close((totals / count).flatten(1).T, expected)


def test_an_empty_loader_is_refused() -> None:
    with pytest.raises(ValueError, match="yielded no images"):
        mean_training_descriptor(lambda batch, paths: batch, [], _RecordingStrategy(), torch.device("cpu"))
