r"""The plain backend: ADFA's patch scores as the formulas read, every step one full tensor.

:func:`plain_scores` computes the ``(B, T, N)`` distances (:func:`~anomalib_adfa.scoring.distances.dense_distances`),
the weights of the operator (:func:`~anomalib_adfa.scoring.soft_topk.soft_topk`, with its implicit backward, or
the hard top-k) and the weighted sum, with autograd through all of it. On a GPU, where one image's 3136 x 3136
block is small, this is the natural path (``backend="auto"`` picks it there); on a CPU the fused backend
(:mod:`anomalib_adfa.scoring.fused`) gives the same scores without holding the block. The tests compare both
through :class:`~anomalib_adfa.scoring.scorer.PatchScorer`, and against an independent Sinkhorn solver.
"""

from __future__ import annotations

import torch

from anomalib_adfa.scoring.distances import DistanceMode, dense_distances
from anomalib_adfa.scoring.logits import LogitMap, reference_logit_map, sharp_logit_map
from anomalib_adfa.scoring.soft_topk import TopKMode, TopKSettings, soft_topk


def logit_map(distances: torch.Tensor, mode: TopKMode, k: int, epsilon: float) -> LogitMap:
    r"""Logit map of a soft mode for a full distance tensor: logits that favour the ``k`` smallest distances.

    Both soft modes use the OT cost :math:`(d - a)^2 / M` with anchors ``a`` in ``{0, 1}``, so
    :math:`x = (1 - 2 d) / (M \varepsilon)`; they differ only in the detached normaliser ``M``:

    - ``"reference"``: the largest cost of the image, :math:`M = \max_{t,i,a} (d_{ti} - a)^2`
      (Xie et al.'s normalisation, taken per image instead of per batch so that an image's score
      does not depend on its batch mates). With ADFA's distances this makes the weights almost
      uniform.
    - ``"sharp"``: a per-patch scale, distances shifted and divided by the gap between the
      nearest and the ``(k+1)``-th nearest centre, :math:`\tilde d = (d - d_{(1)}) / (d_{(k+1)} - d_{(1)})`
      with :math:`M = 1`, so the temperature follows each patch's own neighbourhood and the weights
      concentrate on the ``k`` nearest centres.

    Args:
        distances: Non-negative distances, shape ``(B, T, N)`` (images, patches, centres).
        mode: ``"reference"`` or ``"sharp"``.
        k: Number of nearest centres.
        epsilon: Entropic regularisation of the OT problem.

    Returns:
        The map (with detached coefficients and the mode's search start); ``map(distances)`` are the logits
        ``(B, T, N)``.

    Raises:
        ValueError: For ``"hard"``, which has no logits.
    """
    distances = distances.detach()
    if mode == "reference":
        return reference_logit_map(
            distances.amin(dim=(1, 2), keepdim=True), distances.amax(dim=(1, 2), keepdim=True), epsilon
        )
    if mode == "sharp":
        return sharp_logit_map(torch.topk(distances, k + 1, dim=-1, largest=False).values, k, epsilon)
    msg = f"topk_mode {mode!r} has no soft logits; use hard_topk for it"
    raise ValueError(msg)


def hard_topk(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Return 0/1 weights that mark the ``k`` smallest distances along the last dimension.

    Args:
        distances: Shape ``(..., n)``.
        k: Number of selected elements.

    Returns:
        0/1 weights of the same shape and dtype, constant with respect to ``distances``.
    """
    indices = torch.topk(distances.detach(), k, dim=-1, largest=False).indices
    return torch.zeros_like(distances).scatter_(-1, indices, 1.0)


def topk_weights(distances: torch.Tensor, topk: TopKSettings) -> torch.Tensor:
    """Nearest-centre weights ``Z`` of a full distance tensor: soft (reference/sharp OT) or hard top-k.

    Args:
        distances: Shape ``(B, T, N)``: distance of each patch to each centre.
        topk: Settings of the operator.

    Returns:
        Weights of shape ``(B, T, N)``; each ``(b, t)`` row sums to ``K``.
    """
    if topk.mode == "hard":
        return hard_topk(distances, topk.k)
    to_logits = logit_map(distances, topk.mode, topk.k, topk.epsilon)
    return soft_topk(to_logits(distances), topk.k, topk.max_steps, start=to_logits.start)


def plain_scores(
    patches: torch.Tensor, centers: torch.Tensor, distance: DistanceMode, topk: TopKSettings
) -> torch.Tensor:
    """Patch scores ``(B, T)``: full distance tensor, weights, weighted sum (autograd through all of it).

    Args:
        patches: Descriptors, shape ``(B, T, D')``.
        centers: Centre bank, shape ``(N, D')``.
        distance: One of :data:`~anomalib_adfa.scoring.distances.DISTANCE_MODES`.
        topk: Settings of the operator; the search makes exactly ``topk.max_steps`` steps (no data-dependent
            exit, so nothing waits on the device).

    Returns:
        Scores of shape ``(B, T)``.
    """
    distances = dense_distances(patches, centers, distance)
    return (topk_weights(distances, topk) * distances).sum(dim=-1)
