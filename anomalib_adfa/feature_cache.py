"""In-memory cache of frozen-backbone features for training.

The backbone is frozen and ADFA's training transforms are deterministic, so every training
image yields the same backbone features in every epoch. The cache keeps them at their native
stage resolutions, keyed by image path, under a fingerprint of everything that determines
them (backbone, weights, layers, pre-processing): a different fingerprint empties the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


class FeatureCache:
    """Bounded store of per-image feature maps.

    Args:
        max_bytes: Memory budget; images beyond it are simply not cached (recomputed each epoch).
        dtype: Storage dtype (``torch.float16`` halves the memory; features are cast back on read).
    """

    def __init__(self, max_bytes: int = 2 * 1024**3, dtype: torch.dtype = torch.float16) -> None:
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.fingerprint: str | None = None
        self._store: dict[str, list[torch.Tensor]] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def bind(self, fingerprint: str) -> None:
        """Use the cache for features identified by ``fingerprint``; drop everything cached under another one."""
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = fingerprint

    def clear(self) -> None:
        """Drop all entries and reset the counters."""
        self._store.clear()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, keys: Sequence[str], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Return the batched features of ``keys`` if every key is cached, else ``None``.

        Args:
            keys: Image identifiers of the batch, length ``B``.
            device: Device of the returned tensors.
            dtype: Dtype of the returned tensors.

        Returns:
            One tensor per layer, ``(B, C_l, H_l, W_l)``, or ``None`` on any miss.
        """
        entries = [self._store.get(key) for key in keys]
        if any(entry is None for entry in entries):
            self.misses += len(keys)
            return None
        self.hits += len(keys)
        return [torch.stack(layer).to(device=device, dtype=dtype) for layer in zip(*entries, strict=True)]

    def put(self, keys: Sequence[str], features: Sequence[torch.Tensor]) -> None:
        """Store the features of a batch, image by image, while the budget allows.

        Args:
            keys: Image identifiers, length ``B``.
            features: One tensor per layer, ``(B, C_l, H_l, W_l)``.
        """
        stored = [feature.detach().to("cpu", self.dtype) for feature in features]
        for index, key in enumerate(keys):
            if key in self._store:
                continue
            entry = [layer[index].clone() for layer in stored]
            size = sum(tensor.numel() * tensor.element_size() for tensor in entry)
            if self._bytes + size > self.max_bytes:
                logger.info("Feature cache budget of %d bytes reached; further images are recomputed", self.max_bytes)
                return
            self._store[key] = entry
            self._bytes += size

    @property
    def hit_rate(self) -> float:
        """Fraction of image lookups served from the cache."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
