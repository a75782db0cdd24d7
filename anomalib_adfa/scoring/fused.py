r"""The fused backend: ADFA's patch scores :math:`s_t = Z_t^\top D(p_t, C)` without the ``(B, T, N)`` distance tensor.

The plain backend (:mod:`anomalib_adfa.scoring.plain`) materialises the distances, the weights of the operator
(:mod:`anomalib_adfa.scoring.soft_topk`) and their product. Here the same scores come chunk by chunk of patch
rows, an image (or as many as the cache holds) at a time (:mod:`anomalib_adfa.scoring.chunking`), with the
algorithm of the top-k mode (:mod:`anomalib_adfa.scoring.modes`): the distances of a chunk by one matmul
(:mod:`anomalib_adfa.scoring.distances`), its passes (:mod:`anomalib_adfa.scoring.kernels`, compiled) and the
threshold search (:mod:`anomalib_adfa.scoring.search`).

With a gradient, the forward also computes each row's gradient direction :math:`G \hat c` per unit of
upstream gradient, with :math:`\partial s / \partial d_j = z_j - b\, s_j (d_j - \bar d)` for logits
:math:`a - b d` (:func:`~anomalib_adfa.scoring.kernels.score_gradient`, from the implicit gradient
:func:`~anomalib_adfa.scoring.soft_topk.topk_weight_grad`; in hard and eager sharp mode from the selected centre
operands), while the chunk is in cache: each score depends on its own patch only, so the backward pass
(:class:`FusedScores`) rescales these stored directions by the upstream gradient, and no distances are kept for
it.

Passes per chunk of the patch-by-centre block in a training step (counted by ``benchmarks/train_speed.py``):
reference mode 1 matmul, 1 extremes pass, 1 evaluation with the gradient (usually) and the gradient's matmul;
sharp and hard mode 1 matmul and 1 group-minima pass; the backward pass none.

Eager and traced runs
---------------------
Whether a run is eager is decided once, in :func:`nearest_center_scores`: while tracing, exporting or compiling,
``tol`` becomes ``None`` and every function below runs with fixed step counts, plain PyTorch passes and a
batch-agnostic chunking, so that an exported graph holds ordinary operators and takes any batch size.
"""

from __future__ import annotations

import torch

from anomalib_adfa.scoring.chunking import CHUNK_ELEMENTS, Chunking, chunking_for, default_chunk_elements
from anomalib_adfa.scoring.distances import (
    DistanceMode,
    check_distance,
    distance_operands,
    patch_gradient,
    patch_scale,
)
from anomalib_adfa.scoring.modes import Result, Sweep, mode_scores
from anomalib_adfa.scoring.soft_topk import TopKSettings, default_tolerance


def is_traced() -> bool:
    """Whether this call is being traced, exported or compiled (no data-dependent exits, plain passes)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def sweeps(patch_operand: torch.Tensor, center_operand: torch.Tensor, chunking: Chunking, sweep: Sweep) -> Result:
    """:func:`~anomalib_adfa.scoring.modes.mode_scores` over the batch, :attr:`Chunking.images_per_sweep` at a time."""
    # The whole batch is passed unsliced when it fits one sweep, so that a traced graph keeps its batch free.
    step = chunking.images_per_sweep
    groups = [patch_operand] if step >= patch_operand.shape[0] else patch_operand.split(step)
    parts = [mode_scores(group, center_operand, sweep) for group in groups]
    if len(parts) == 1:
        return parts[0]
    scores = torch.cat([part[0] for part in parts])
    return scores, torch.cat([part[1] for part in parts]) if sweep.with_gradient else None


class FusedScores(torch.autograd.Function):
    """Fused ``distances -> top-k weights -> weighted sum``; the backward rescales the directions of the forward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        patches: torch.Tensor,
        centers: torch.Tensor,
        scale: torch.Tensor | None,
        chunking: Chunking,
        sweep: Sweep,
    ) -> torch.Tensor:  # type: ignore[override]
        patch_operand, center_operand = distance_operands(patches, centers, scale)
        scores, directions = sweeps(patch_operand, center_operand, chunking, sweep)
        ctx.save_for_backward(patches)
        ctx.scale, ctx.directions = scale, directions
        return scores

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_scores: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (patches,) = ctx.saved_tensors
        return patch_gradient(ctx.directions, patches, grad_scores, ctx.scale), None, None, None, None


def nearest_center_scores(
    patches: torch.Tensor,
    centers: torch.Tensor,
    distance: DistanceMode,
    topk: TopKSettings,
    chunk_elements: int | None = None,
    tol: float | None = None,
) -> torch.Tensor:
    r"""ADFA's patch scores :math:`s_t = Z_t^\top D(p_t, C)`, fused and chunked.

    Equal (values and gradients with respect to ``patches``) to the plain backend's
    :func:`~anomalib_adfa.scoring.plain.plain_scores`, but it never holds more than one ``(B, T, N)`` tensor:
    the distances come from one matmul per chunk of patch rows, the threshold search runs on cache-sized
    chunks, and the gradient directions are computed in the forward, on chunks still in cache, so that the
    backward pass only rescales them. In hard mode only the ``K`` selected distances are kept. The centres get
    no gradient (they are a fixed bank).

    Args:
        patches: Descriptors, shape ``(B, T, D')``.
        centers: Centre bank, shape ``(N, D')``.
        distance: One of :data:`~anomalib_adfa.scoring.distances.DISTANCE_MODES`.
        topk: Settings of the soft top-k (``K``, mode, epsilon, maximum solver steps).
        chunk_elements: Target number of elements of one ``(B, t, N)`` chunk; default
            :func:`~anomalib_adfa.scoring.chunking.default_chunk_elements`, and
            :data:`~anomalib_adfa.scoring.chunking.CHUNK_ELEMENTS` per image while tracing or exporting.
        tol: Relative tolerance of the threshold search's early exit; default
            :func:`~anomalib_adfa.scoring.soft_topk.default_tolerance` of the dtype. The exit is skipped while
            tracing or exporting.

    Returns:
        Scores of shape ``(B, T)``.

    Raises:
        ValueError: If ``centers`` requires a gradient or ``distance`` is unknown.
    """
    if centers.requires_grad:
        msg = "nearest_center_scores treats the centre bank as constant; detach the centres"
        raise ValueError(msg)
    check_distance(distance)
    eager = not is_traced()
    tol = (default_tolerance(patches.dtype) if tol is None else tol) if eager else None
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(patches.dtype) if eager else CHUNK_ELEMENTS
    # An exported graph takes any batch size, so its chunks must not depend on it: there the budget is per image.
    batch, num_patches = patches.shape[:2]
    chunking = chunking_for(batch, num_patches, centers.shape[0], patches.dtype, chunk_elements, not eager)
    scale = patch_scale(distance, patches, centers)
    with_gradient = torch.is_grad_enabled() and patches.requires_grad
    sweep = Sweep(topk, distance == "euclidean", chunking.rows_per_chunk, tol, with_gradient)
    if with_gradient:
        return FusedScores.apply(patches, centers, scale, chunking, sweep)
    patch_operand, center_operand = distance_operands(patches, centers, scale)
    return sweeps(patch_operand, center_operand, chunking, sweep)[0]
