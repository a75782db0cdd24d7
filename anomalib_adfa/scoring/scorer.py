"""The module the model scores with: one interface, a plain and a fused backend."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from anomalib_adfa.scoring.distances import DistanceMode, check_distance
from anomalib_adfa.scoring.fused import nearest_center_scores
from anomalib_adfa.scoring.plain import plain_scores
from anomalib_adfa.scoring.soft_topk import TopKMode, TopKSettings

Backend = Literal["auto", "plain", "fused"]

BACKENDS: tuple[str, ...] = ("auto", "plain", "fused")


def resolve_backend(backend: Backend, device: torch.device) -> Literal["plain", "fused"]:
    """Return the backend that runs on ``device``: ``"auto"`` is the fused one on a CPU, the plain one elsewhere."""
    if backend != "auto":
        return backend
    return "fused" if device.type == "cpu" else "plain"


class PatchScorer(nn.Module):
    """ADFA's patch scores ``s_t = Z_t^T D(p_t, C)`` with fixed settings, by the plain or the fused backend.

    Both backends give the same scores and gradients (``tests/test_scoring_backends.py``); the backend is a
    run-time choice that checkpoints do not record.

    Args:
        num_nearest: ``K`` of the soft top-k.
        topk_mode: ``"reference"``, ``"sharp"`` or ``"hard"`` (see :mod:`anomalib_adfa.scoring.soft_topk`).
        ot_epsilon: Entropic regularisation of the soft top-k.
        distance: ``"kl_weighted"``, ``"squared"`` or ``"euclidean"`` (see
            :func:`~anomalib_adfa.scoring.distances.patch_scale`).
        num_iterations: Maximum threshold-search steps; default: the mode's
            :data:`~anomalib_adfa.scoring.soft_topk.MAX_SOLVER_STEPS`.
        backend: ``"plain"`` (:mod:`anomalib_adfa.scoring.plain`: full distance tensor, the operator, the
            weighted sum), ``"fused"`` (:mod:`anomalib_adfa.scoring.fused`: chunked, cache-sized, compiled
            passes) or ``"auto"``: fused on a CPU, plain on other devices.

    Raises:
        ValueError: If ``distance``, ``topk_mode`` or ``backend`` is unknown.
    """

    def __init__(
        self,
        num_nearest: int = 3,
        topk_mode: TopKMode = "reference",
        ot_epsilon: float = 0.1,
        distance: DistanceMode = "kl_weighted",
        num_iterations: int | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_distance(distance)
        if backend not in BACKENDS:
            msg = f"backend must be one of {BACKENDS}, got {backend!r}"
            raise ValueError(msg)
        self.distance = distance
        self.backend = backend
        self.topk = TopKSettings(num_nearest, topk_mode, ot_epsilon, num_iterations)

    def forward(self, patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Score every patch.

        Args:
            patches: Descriptors, shape ``(B, T, D')``.
            centers: Centre bank, shape ``(N, D')``, without gradient.

        Returns:
            Scores of shape ``(B, T)``.
        """
        if resolve_backend(self.backend, patches.device) == "plain":
            return plain_scores(patches, centers, self.distance, self.topk)
        return nearest_center_scores(patches, centers, self.distance, self.topk)

    def extra_repr(self) -> str:
        topk = self.topk
        return (
            f"distance={self.distance!r}, k={topk.k}, mode={topk.mode!r}, epsilon={topk.epsilon}, "
            f"num_iterations={topk.max_steps}, backend={self.backend!r}"
        )
