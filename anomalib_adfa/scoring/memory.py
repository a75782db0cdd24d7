"""The per-thread buffer that the fused backend's soft-mode sweeps write their distances and gradients into."""

from __future__ import annotations

import threading

import torch


class SweepMemory(threading.local):
    """Memory for the distance block of a soft-mode sweep and its gradient chunk, kept from one call to the next.

    A soft-mode sweep holds the distances of its images (sized to the last-level cache) and one gradient chunk at
    once. Allocated afresh in every call, glibc's allocator hands that memory back to the system when the call
    frees it (a free heap top beyond twice its largest recent allocation is trimmed), and the next call pays for
    it again in page faults: 10 to 120 thousand per Lite0 training step of ``benchmarks/train_speed.py`` on the
    project's Xeon, none in its floor. Eager CPU runs therefore take it from here; one buffer per thread, the
    largest yet asked for, is kept (at most the cache size plus one chunk).
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def take(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """Return a flat tensor of ``numel`` elements of ``like``'s dtype (its contents undefined)."""
        buffer = self.buffer
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            self.buffer = None  # the old one is freed before its successor is allocated
            self.buffer = buffer = like.new_empty(numel)
        return buffer[:numel]


sweep_memory = SweepMemory()
