r"""Exact selection of each row's few smallest distances, and the gradient directions of rows scored on them.

Hard mode and eager sharp mode need only a handful of distances per patch row; :func:`smallest_distances` finds
them exactly in fewer passes than ``torch.topk`` over the full row, and :func:`selected_directions` turns the
gradient by those distances into the row's direction :math:`G \hat c` without gathering the centre operands.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_adfa.scoring import kernels


def selection_block(num_centers: int, count: int) -> int:
    """Group size of :func:`smallest_distances`: the largest divisor of ``N`` not above ``sqrt(N / count)``."""
    limit = math.isqrt(max(1, num_centers // count))
    return max(size for size in range(1, limit + 1) if num_centers % size == 0)


def smallest_distances(distances: torch.Tensor, count: int, eager: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``count`` smallest clamped distances of each row, increasing, and their columns.

    ``torch.topk`` over a full row costs several passes; instead the columns are cut into ``N / m`` groups of
    ``m`` (:func:`selection_block`; group ``g`` holds the columns ``g, g + N/m, g + 2N/m, ...``, so that one
    vectorised pass takes every group's minimum), and ``topk`` runs on the group minima and then on the
    ``count`` groups with the smallest minima only. This is exact: an element among the ``count`` smallest of
    its row that lay in another group would be exceeded by at least ``count`` other elements, the minima of
    the chosen groups.

    Args:
        distances: Raw distances ``(R, N)``.
        count: Number of distances per row, at most ``N``.
        eager: Whether the group minima may run compiled (``False`` while tracing or exporting).

    Returns:
        Values ``(R, count)`` and column indices ``(R, count)``.
    """
    num_centers = distances.shape[-1]
    size = selection_block(num_centers, count)
    if size == 1:
        values, indices = torch.topk(distances, count, dim=-1, largest=False)
        return values.clamp_min(0.0), indices
    groups = num_centers // size
    minima = kernels.group_minima(distances, size, eager=eager)
    # Unsorted selections and one sort of the result: torch.topk's sorted output costs twice as much for count 16.
    chosen = torch.topk(minima, count, dim=-1, largest=False, sorted=False).indices
    columns = (chosen.unsqueeze(-1) + groups * torch.arange(size, device=distances.device)).flatten(1)
    values, picked = torch.topk(distances.gather(1, columns), count, dim=-1, largest=False, sorted=False)
    values, order = values.sort(dim=-1)
    return values.clamp_min(0.0), columns.gather(1, picked.gather(1, order))


def selected_directions(chain: torch.Tensor, columns: torch.Tensor, center_operand: torch.Tensor) -> torch.Tensor:
    r"""Directions :math:`\sum_c \text{chain}_{rc}\, \hat c_{\text{columns}_{rc}}` of rows scored on a few centres.

    ``torch.nn.functional.embedding_bag`` sums the weighted centre operands per row without materialising the
    ``(R, C, D' + 2)`` gather (92 MB for a Lite0 batch in sharp mode, 0.9 GB with WR50 dimensions).

    Args:
        chain: Gradient of each row's score by its selected distances, ``(R, C)``.
        columns: The selected centres' indices, ``(R, C)``.
        center_operand: ``(N, D' + 2)``.

    Returns:
        ``(R, D' + 2)``.
    """
    return F.embedding_bag(columns, center_operand, mode="sum", per_sample_weights=chain)


def nearest_count(k: int, num_centers: int, wanted: int) -> int:
    """How many nearest distances a sharp-mode row keeps: ``wanted``, at least ``K + 1``, at most ``N``."""
    return min(num_centers, max(k + 1, wanted))
