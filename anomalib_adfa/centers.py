"""ADFA's centre bank: the mean initial descriptor of every training image at every position, over all ranks.

Before the first training step :class:`~anomalib_adfa.Adfa` fixes one centre per feature-map position, the mean of
the (not yet adapted) descriptors of all training images there. Under DDP each rank sums its own shard and the
sums and counts are all-reduced, so every image counts exactly once, on every rank: :func:`distinct_shard_batches`
cuts the copies a ``DistributedSampler`` appends to even out the shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from anomalib.data import Batch
from torch.utils.data import DistributedSampler


def mean_training_descriptor(
    describe: Callable[[torch.Tensor, Sequence[str] | None], torch.Tensor],
    loader: Iterable[Batch],
    strategy: Any,
    device: torch.device,
) -> torch.Tensor:
    """Mean descriptor of every training image at every position, over all ranks.

    Args:
        describe: Descriptors ``(B, D', H, W)`` of a batch of raw images ``(B, 3, h, w)`` (on ``device``) and
            their paths (``None`` if the batch has none).
        loader: Training dataloader of this process.
        strategy: Lightning strategy whose ``reduce(tensor, reduce_op="sum")`` sums over the ranks.
        device: Device of the model.

    Returns:
        Centres of shape ``(H*W, D')``.

    Raises:
        ValueError: If the loader yields no images.
    """
    total: torch.Tensor | None = None
    count = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad():
        for images, paths in distinct_shard_batches(loader):
            descriptors = describe(images.to(device), paths)
            batch_sum = descriptors.sum(dim=0, dtype=torch.float64)
            total = batch_sum if total is None else total + batch_sum
            count += descriptors.shape[0]
    if total is None:
        msg = "ADFA cannot compute its centres: the training dataloader yielded no images"
        raise ValueError(msg)
    total = strategy.reduce(total, reduce_op="sum")
    count = strategy.reduce(count, reduce_op="sum")
    return (total / count).float().flatten(1).T


def distinct_shard_batches(loader: Iterable[Batch]) -> Iterator[tuple[torch.Tensor, Sequence[str] | None]]:
    """Images and paths of the loader's batches, without the padding of a ``DistributedSampler``.

    Without ``drop_last`` a ``DistributedSampler`` repeats the first samples of its (shuffled) order so that
    every rank gets ``ceil(N / world_size)`` of them. The repeats fill the last positions of the global
    order, of which rank ``r`` takes every ``world_size``-th from ``r`` on, so only the tail of a rank's
    order is padding and its first ``len(range(r, N, world_size))`` samples are distinct.

    Args:
        loader: Training dataloader of this process.

    Yields:
        Images and image paths (``None`` if the batch has none) of each batch, cut where the padding starts.
    """
    sampler = getattr(loader, "sampler", None)
    remaining: int | None = None
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        remaining = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
    for batch in loader:
        images, paths = batch.image, getattr(batch, "image_path", None)
        if remaining is not None:
            if remaining <= 0:
                return
            images = images[:remaining]
            paths = None if paths is None else paths[:remaining]
            remaining -= images.shape[0]
        yield images, paths
