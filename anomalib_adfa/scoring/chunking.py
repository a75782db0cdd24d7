"""How the fused backend cuts the patch-by-centre block into chunks and sweeps, sized to the CPU's cache.

The cache size is read at run time (Linux sysfs, :func:`last_level_cache_bytes`); the fraction of it a chunk
takes (:func:`default_chunk_elements`) was measured on one machine, and its docstring says how to measure it
again on another.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch

# Elements of one chunk of the patch-by-centre matrix in exported graphs, per image (an exported graph must not
# depend on the machine that exported it). Eager runs size chunks to the cache (default_chunk_elements).
CHUNK_ELEMENTS = 1 << 20

# Assumed size of the last-level cache where the operating system does not report it.
DEFAULT_CACHE_BYTES = 32 << 20


@functools.cache
def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs), or :data:`DEFAULT_CACHE_BYTES` where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        multiplier = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * multiplier)
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def default_chunk_elements(dtype: torch.dtype) -> int:
    """Chunk size of eager runs: a sixth of the last-level cache (2 M float32 elements on a 48 MiB L3).

    The sixth was measured, not derived. To re-derive it on another machine, run ``python -m
    benchmarks.train_speed --repeats 3`` with this function patched to other fractions of the cache and keep the
    one with the lowest ``ours/floor`` ratios (the benchmark prints the chunk size it ran with).

    A chunk, its weights and (written over them) its gradient then stay in cache with part of the image's
    distances. Measured on the 2-core Xeon (48 MiB L3) with ``benchmarks/train_speed.py``'s step, as a ratio to
    its floor: reference mode 1.16 at 2 M elements and 1.50 at 4 M with WR50 dimensions, 1.18 and 1.16 with
    Lite0's; sharp mode 1.20 and 1.28 (WR50), 1.68 and 1.82 (Lite0). Chunks of 1 M and less paid Python and
    dispatch overhead (Lite0 reference 1.70 at 1 M, 1.82 at 0.5 M), chunks of 8 M and more left the cache
    (1.62 at 8 M, 2.00 at 16 M).
    """
    return max(CHUNK_ELEMENTS // 4, last_level_cache_bytes() // (6 * torch.finfo(dtype).bits // 8))


class Chunking(NamedTuple):
    """How the patch-by-centre block of a batch is traversed.

    Attributes:
        images_per_sweep: Images whose whole distance block is computed before their search runs; as many as
            fit the last-level cache (at least one), so that the second sweep of the soft modes reads from cache.
        rows_per_chunk: Patch rows per image in one chunk of the sweep.
    """

    images_per_sweep: int
    rows_per_chunk: int


def chunking_for(
    batch: int, num_patches: int, num_centers: int, dtype: torch.dtype, chunk_elements: int, batch_agnostic: bool
) -> Chunking:
    """Choose the :class:`Chunking` of a batch: chunks of about ``chunk_elements``, sweeps sized to the cache.

    A ``batch_agnostic`` traversal (for exported graphs, which take any batch size) sweeps the whole batch at
    once and sizes chunks per image.
    """
    if batch_agnostic:
        return Chunking(batch, max(1, chunk_elements // num_centers))
    block_bytes = num_patches * num_centers * torch.finfo(dtype).bits // 8
    images = max(1, min(batch, last_level_cache_bytes() // block_bytes))
    return Chunking(images, max(1, chunk_elements // (images * num_centers)))


def chunk_bounds(num_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` of the chunks of ``num_rows`` patch rows."""
    return [(start, min(start + rows_per_chunk, num_rows)) for start in range(0, num_rows, rows_per_chunk)]
