"""Cache of frozen-backbone features for training, in memory up to a budget and on disk beyond it.

The backbone is frozen and ADFA's training transforms are deterministic, so every training
image yields the same backbone features in every epoch. The cache keeps them at their native
stage resolutions (optionally in half precision), keyed by image path, under a fingerprint of
everything that determines them (backbone, weights, layers, pre-processing): a different
fingerprint empties the cache. Images beyond the memory budget are written to a temporary
directory and read back from there in later epochs. With random training augmentations the
features change from epoch to epoch, so the cache must then be disabled (see
:func:`random_transform_reason`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler

logger = logging.getLogger(__name__)

# Transforms whose output depends on the input only: they cannot make cached features stale.
DETERMINISTIC_TRANSFORMS = frozenset(
    {
        "CenterCrop",
        "ConvertImageDtype",
        "Identity",
        "Normalize",
        "Resize",
        "ToDtype",
        "ToImage",
        "ToPureTensor",
        "ToTensor",
    }
)
_CONTAINERS = frozenset({"Compose", "Sequential"})


def random_transform_reason(transform: Any) -> str | None:
    """Explain why ``transform`` may give different images from epoch to epoch, or return ``None``.

    Only :data:`DETERMINISTIC_TRANSFORMS`, possibly nested in ``Compose``/``Sequential``, count as
    deterministic; anything else is assumed random.

    Args:
        transform: A torchvision (v1 or v2) transform, a container of them, or ``None``.

    Returns:
        ``None`` if the transform is deterministic, else a sentence naming the offending transform.
    """
    if transform is None:
        return None
    name = type(transform).__name__
    if name in _CONTAINERS:
        children: Iterable[Any] = getattr(transform, "transforms", None) or list(transform)
        return next((reason for child in children if (reason := random_transform_reason(child))), None)
    if name in DETERMINISTIC_TRANSFORMS:
        return None
    return f"the training augmentations contain {name}, which is not known to be deterministic"


class FeatureCache:
    """Store of per-image feature maps: in memory within ``max_bytes``, then on disk within ``max_disk_bytes``.

    Args:
        max_bytes: Memory budget in bytes.
        dtype: Storage dtype (``torch.float16`` halves the memory; features are cast back on read).
        max_disk_bytes: Budget of the disk store; ``0`` disables spilling (images beyond the memory
            budget are then recomputed every epoch).
        spill_dir: Parent of the temporary spill directory (default: the system's temporary directory).
    """

    def __init__(
        self,
        max_bytes: int = 2 * 1024**3,
        dtype: torch.dtype = torch.float16,
        max_disk_bytes: int = 16 * 1024**3,
        spill_dir: str | Path | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes
        self.dtype = dtype
        self.spill_dir = spill_dir
        self.fingerprint: str | None = None
        self.disabled_reason: str | None = None
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._disk: dict[str, Path] = {}
        self._bytes = 0
        self._disk_bytes = 0
        self._directory: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self._bytes

    @property
    def disk_nbytes(self) -> int:
        """Bytes held in the disk store."""
        return self._disk_bytes

    @property
    def num_on_disk(self) -> int:
        """Number of images held in the disk store."""
        return len(self._disk)

    @property
    def enabled(self) -> bool:
        """Whether lookups and insertions are served (see :meth:`disable`)."""
        return self.disabled_reason is None

    def bind(self, fingerprint: str) -> None:
        """Use the cache for features identified by ``fingerprint``; drop everything cached under another one."""
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = fingerprint

    def disable(self, reason: str) -> None:
        """Stop serving and storing features, drop the entries and log ``reason``."""
        logger.warning("Feature cache disabled: %s", reason)
        self.clear()
        self.disabled_reason = reason

    def enable(self) -> None:
        """Serve and store features again after :meth:`disable`."""
        self.disabled_reason = None

    def prepare(self, augmentations: Any, fingerprint: str) -> None:
        """Before training: serve the features ``fingerprint`` identifies; disable the cache under random augmentations.

        Args:
            augmentations: The training augmentations (see :func:`random_transform_reason`).
            fingerprint: :func:`feature_fingerprint` of the model.
        """
        reason = random_transform_reason(augmentations)
        if reason is None:
            self.enable()
            self.bind(fingerprint)
        else:
            self.disable(reason)

    def clear(self) -> None:
        """Drop all entries (memory and disk) and reset the counters."""
        self._memory.clear()
        self._disk.clear()
        self._bytes = self._disk_bytes = 0
        self.hits = self.misses = 0
        if self._finalizer is not None:
            self._finalizer()
        self._directory = self._finalizer = None

    def reset_counters(self) -> None:
        """Start a new hit-rate window (e.g. every epoch) without dropping entries."""
        self.hits = self.misses = 0

    def get(self, keys: Sequence[str], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Return the batched features of ``keys`` if every key is cached, else ``None``.

        Args:
            keys: Image identifiers of the batch, length ``B``.
            device: Device of the returned tensors.
            dtype: Dtype of the returned tensors.

        Returns:
            One tensor per layer, ``(B, C_l, H_l, W_l)``, or ``None`` on any miss (or when disabled).
        """
        if not self.enabled:
            return None
        if not all(key in self._memory or key in self._disk for key in keys):
            self.misses += len(keys)
            return None
        self.hits += len(keys)
        entries = [self._memory.get(key) or torch.load(self._disk[key], weights_only=True) for key in keys]
        return [torch.stack(layer).to(device=device, dtype=dtype) for layer in zip(*entries, strict=True)]

    def put(self, keys: Sequence[str], features: Sequence[torch.Tensor]) -> None:
        """Store the features of a batch image by image: in memory, then on disk, while the budgets allow.

        Args:
            keys: Image identifiers, length ``B``.
            features: One tensor per layer, ``(B, C_l, H_l, W_l)``.
        """
        if not self.enabled:
            return
        stored = [feature.detach().to("cpu", self.dtype) for feature in features]
        for index, key in enumerate(keys):
            if key in self._memory or key in self._disk:
                continue
            entry = [layer[index].clone() for layer in stored]
            size = sum(tensor.numel() * tensor.element_size() for tensor in entry)
            if self._bytes + size <= self.max_bytes:
                self._memory[key] = entry
                self._bytes += size
            elif self._disk_bytes + size <= self.max_disk_bytes:
                path = self._spill_directory() / f"{len(self._disk)}.pt"
                torch.save(entry, path)
                self._disk[key] = path
                self._disk_bytes += size
            else:
                logger.info("Feature cache budgets reached; further images are recomputed every epoch")
                return

    def _spill_directory(self) -> Path:
        if self._directory is None:
            if self.spill_dir is not None:
                Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
            self._directory = Path(tempfile.mkdtemp(prefix="adfa-features-", dir=self.spill_dir))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._directory, True)
            logger.info(
                "Feature cache memory budget of %d bytes reached; spilling to %s", self.max_bytes, self._directory
            )
        return self._directory

    @property
    def hit_rate(self) -> float:
        """Fraction of image lookups served from the cache since the last reset."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def cached_features(
    cache: FeatureCache | None,
    extract: Callable[[torch.Tensor], list[torch.Tensor]],
    images: torch.Tensor,
    paths: Sequence[str] | None,
) -> list[torch.Tensor]:
    """Frozen-backbone features of pre-processed images, from the cache when possible, else extracted and stored.

    Args:
        cache: The cache, or ``None`` for none.
        extract: The backbone's feature extraction, images ``(B, 3, H, W)`` to one map per stage.
        images: Pre-processed images ``(B, 3, H, W)``.
        paths: Their paths (the cache keys); ``None`` bypasses the cache.

    Returns:
        One feature map ``(B, C_l, H_l, W_l)`` per stage.
    """
    if cache is not None and paths is not None:
        cached = cache.get(paths, images.device, images.dtype)
        if cached is not None:
            return cached
    features = extract(images)
    if cache is not None and paths is not None:
        cache.put(paths, features)
    return features


def feature_fingerprint(hparams: Mapping[str, Any], transform: Any) -> str:
    """Identify everything that determines the cached features: backbone, layers, weights file, pre-processing.

    Args:
        hparams: The model's hyperparameters (``backbone``, ``layers``, ``pre_trained``, ``backbone_weights``).
        transform: The pre-processor's transform.

    Returns:
        A hex digest.
    """
    weights = hparams.get("backbone_weights")
    weights_id = ""
    if weights is not None and Path(weights).is_file():
        stat = Path(weights).stat()
        weights_id = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    parts = (hparams.get("backbone"), tuple(hparams.get("layers", ())), hparams.get("pre_trained"))
    return hashlib.sha256(repr((parts, weights_id, repr(transform))).encode()).hexdigest()


def training_augmentations(trainer: Any) -> Any:
    """Augmentations of the training images: the training dataset's, else the datamodule's."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    if hasattr(dataset, "augmentations"):
        return dataset.augmentations
    return getattr(getattr(trainer, "datamodule", None), "train_augmentations", None)


def keep_ddp_shards(cache: FeatureCache | None, loader: Any) -> None:
    """Under DDP with the feature cache, keep each rank on its own shard of the training images.

    Lightning's ``DistributedSampler`` deals the images out afresh every epoch, so a rank would keep meeting
    images it has not cached. Pinning the sampler's epoch keeps each rank's shard (and its order) fixed: every
    rank caches only its shard and computes each of its images once. Call at the start of every epoch.

    Args:
        cache: The model's cache, or ``None``.
        loader: The training dataloader.
    """
    sampler = getattr(loader, "sampler", None)
    if cache is not None and cache.enabled and isinstance(sampler, DistributedSampler):
        sampler.set_epoch(0)
