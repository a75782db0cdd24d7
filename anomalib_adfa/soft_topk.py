r"""Exact soft top-k by entropic optimal transport with two anchors.

Xie et al. (2020, "Differentiable Top-k with Optimal Transport") relax the top-k selection of
``n`` scores into an entropic optimal-transport problem between the scores (mass
:math:`\mu_i = 1/n` each) and two anchors (masses :math:`\nu = [K/n, (n-K)/n]`): the anchor
that receives mass ``K/n`` collects the selected elements. With the cost matrix
:math:`C \in \mathbb{R}^{n \times 2}` the plan solves

.. math::

    \Gamma^\star = \arg\min_{\Gamma \ge 0} \langle \Gamma, C \rangle - \varepsilon H(\Gamma)
    \quad \text{s.t.} \quad \Gamma \mathbf{1} = \mu,\ \Gamma^\top \mathbf{1} = \nu .

Derivation of the closed form used here
---------------------------------------
The optimality conditions give :math:`\Gamma_{ia} = \exp((f_i + g_a - C_{ia}) / \varepsilon)`
for dual potentials :math:`f, g`. The row constraint :math:`\Gamma_{i0} + \Gamma_{i1} = \mu_i`
eliminates :math:`f_i`:

.. math::

    \Gamma_{i0} = \mu_i \, \sigma\!\left(\tau + x_i\right), \qquad
    x_i = \frac{C_{i1} - C_{i0}}{\varepsilon}, \qquad \tau = \frac{g_0 - g_1}{\varepsilon},

with :math:`\sigma` the logistic function. Only one scalar is left, fixed by the column
constraint :math:`\sum_i \Gamma_{i0} = K/n`. With :math:`\mu_i = 1/n` and the selection weights
:math:`z_i = n \Gamma_{i0} \in (0, 1)`:

.. math::

    z_i = \sigma(\tau + x_i), \qquad F(\tau) = \sum_i \sigma(\tau + x_i) - K = 0 .

:math:`F` is strictly increasing (:math:`F' = \sum_i s_i` with :math:`s_i = z_i (1 - z_i) > 0`),
so the root is unique and lies in the bracket

.. math::

    \operatorname{logit}(K/n) - \max_i x_i \;\le\; \tau \;\le\; \operatorname{logit}(K/n) - \min_i x_i .

Sinkhorn's 200 alternating scalings are therefore replaced by a one-dimensional root search:
Newton steps on :math:`F`, each kept inside the shrinking bracket (a step leaving it is replaced
by bisection), started from the uniform solution :math:`\tau_0 = \operatorname{logit}(K/n) -
\bar{x}`, which is exact when all :math:`x_i` are equal.

Backward pass (implicit function theorem)
-----------------------------------------
Differentiating :math:`F(\tau(x), x) = 0` gives :math:`\partial\tau/\partial x_j = -s_j / S` with
:math:`S = \sum_i s_i`. Hence

.. math::

    \frac{\partial z_i}{\partial x_j} = s_i \delta_{ij} - \frac{s_i s_j}{S}, \qquad
    \frac{\partial L}{\partial x_j} = s_j \left(g_j - \bar{g}\right), \quad
    \bar{g} = \frac{\sum_i g_i s_i}{S}, \quad g = \frac{\partial L}{\partial z},

an O(n) vector-Jacobian product that needs only the forward output :math:`z`.

Fused patch scores
------------------
ADFA needs only :math:`s_t = \sum_j z_{tj} d_{tj}` per patch. :func:`nearest_center_scores` computes it
chunk by chunk of patch rows: one matmul gives a chunk's distances, the search above runs on it while it
is in cache, and the backward pass recomputes the weights from the stored distances and one threshold per
row (:math:`\partial s / \partial d_j = z_j - b\, s_j (d_j - \bar d)` for logits :math:`a - b d`) and
returns the gradient with one more matmul per chunk.

Costs used by ADFA
------------------
For distances :math:`d_i \ge 0` and anchors 0 and 1 the cost is
:math:`C_{ia} = (d_i - a)^2 / M`, so :math:`x_i = (1 - 2 d_i) / (M \varepsilon)`: anchor 0 takes
the ``K`` *smallest* distances, and :math:`z` is a logistic threshold on the distances with
temperature :math:`M \varepsilon / 2`. The normaliser :math:`M` decides how sharp the selection
is (see :func:`selection_logits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import nn

from anomalib_adfa.distances import EUCLIDEAN_EPS, PatchCenterDistance, distance_operands, operand_distances

TopKMode = Literal["reference", "sharp", "hard"]
TOPK_MODES: tuple[str, ...] = ("reference", "sharp", "hard")
# Newton steps per mode: eager code stops earlier at tolerance, exported graphs run exactly these.
# Reference mode reaches float32 precision in 1 step from the uniform start, sharp mode in 3-4
# from its start between the K-th and (K+1)-th logits; hard mode has no search.
MAX_SOLVER_STEPS: dict[str, int] = {"reference": 4, "sharp": 12, "hard": 0}

_SHARP_SCALE_FLOOR = 1e-12


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative residual at which the threshold search stops early: a few ulps of ``k`` in ``dtype``."""
    return 64.0 * torch.finfo(dtype).eps


def may_exit_early() -> bool:
    """Whether data-dependent early exits are allowed (not while tracing, exporting or compiling)."""
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def _threshold_bracket(logits: torch.Tensor, k: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    r"""Return :math:`\operatorname{logit}(k/n)` and the bracket of :math:`\tau`, each ``(..., 1)``."""
    n = logits.shape[-1]
    if not 0 < k < n:
        msg = f"soft top-k needs 0 < k < n, got k={k} for n={n} elements"
        raise ValueError(msg)
    logit_ratio = math.log(k / (n - k))
    return logit_ratio, logit_ratio - logits.amax(dim=-1, keepdim=True), logit_ratio - logits.amin(dim=-1, keepdim=True)


def newton_threshold(
    weights_at: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    tau: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    num_iterations: int,
    tol: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Safeguarded Newton search of the root of :math:`F(\tau) = \sum_i w_i(\tau) - k`.

    ``weights_at(tau)`` must return :math:`w_i = \sigma(\tau + x_i)` for some fixed logits, so that
    :math:`F' = \sum_i w_i (1 - w_i)`; callers pick the cheapest way to evaluate it. Every iterate
    stays inside a bracket that shrinks with the sign of :math:`F`; a Newton step leaving it is
    replaced by the bracket's midpoint. With ``tol`` the loop stops as soon as
    :math:`\max |F| \le tol \cdot k` and returns the weights it has just evaluated, so no pass is
    spent on a step that is not needed.

    Args:
        weights_at: Map from thresholds ``(..., 1)`` to weights ``(..., n)``.
        k: Number of selected elements.
        tau: Start, shape ``(..., 1)``.
        lower: Lower bound of the root, shape ``(..., 1)``.
        upper: Upper bound of the root, shape ``(..., 1)``.
        num_iterations: Maximum number of steps.
        tol: Relative tolerance for the early exit, or ``None`` for a fixed number of steps.

    Returns:
        Thresholds ``(..., 1)`` and the weights at them, ``(..., n)``.
    """
    check = tol is not None and may_exit_early()
    tiny = torch.finfo(tau.dtype).tiny
    for _ in range(num_iterations):
        weights = weights_at(tau)
        residual = weights.sum(dim=-1, keepdim=True) - k
        if check and bool(residual.abs().max() <= tol * k):
            return tau, weights
        slope = torch.addcmul(weights, weights, weights, value=-1.0).sum(dim=-1, keepdim=True)
        lower = torch.where(residual < 0, tau, lower)
        upper = torch.where(residual > 0, tau, upper)
        newton = tau - residual / slope.clamp_min(tiny)
        inside = (newton >= lower) & (newton <= upper)
        tau = torch.where(inside, newton, 0.5 * (lower + upper))
    return tau, weights_at(tau)


def solve_threshold(
    logits: torch.Tensor,
    k: int,
    num_iterations: int = 8,
    tol: float | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Find :math:`\tau` with :math:`\sum_i \sigma(\tau + x_i) = k` along the last dimension.

    Safeguarded Newton (:func:`newton_threshold`) inside the bracket of the module docstring. The
    loop has a fixed length unless ``tol`` is given, in which case it stops early once
    :math:`\max |F| \le tol \cdot k` (a data-dependent exit, skipped while tracing or exporting).

    Args:
        logits: Scores :math:`x`, shape ``(..., n)``.
        k: Number of selected elements, ``0 < k < n``.
        num_iterations: Maximum number of Newton/bisection steps.
        tol: Optional relative tolerance on :math:`F` for an early exit.
        start: Optional first iterate ``(..., 1)``; default: the uniform solution
            :math:`\operatorname{logit}(k/n) - \bar{x}`.

    Returns:
        Thresholds :math:`\tau`, shape ``(..., 1)``.
    """
    return _solve(logits, k, num_iterations, tol, start)[0]


def _solve(
    logits: torch.Tensor, k: int, num_iterations: int, tol: float | None, start: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold and weights; see :func:`solve_threshold`."""
    logit_ratio, lower, upper = _threshold_bracket(logits, k)
    tau = logit_ratio - logits.mean(dim=-1, keepdim=True) if start is None else start
    return newton_threshold(lambda shift: torch.sigmoid(logits + shift), k, tau, lower, upper, num_iterations, tol)


def topk_weight_grad(weights: torch.Tensor, grad_weights: torch.Tensor) -> torch.Tensor:
    r"""Implicit-function vector-Jacobian product :math:`s_j (g_j - \bar g)` of the module docstring.

    Args:
        weights: Soft top-k weights :math:`z`, shape ``(..., n)``.
        grad_weights: :math:`g = \partial L / \partial z`, shape ``(..., n)``.

    Returns:
        :math:`\partial L / \partial x`, shape ``(..., n)``.
    """
    slope = torch.addcmul(weights, weights, weights, value=-1.0)
    total = slope.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    mean_grad = torch.linalg.vecdot(grad_weights, slope).unsqueeze(-1) / total
    return (grad_weights - mean_grad).mul_(slope)


class _SoftTopKFunction(torch.autograd.Function):
    """Soft top-k weights with the implicit-function-theorem backward derived in the module docstring."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        k: int,
        num_iterations: int,
        tol: float | None,
        start: torch.Tensor | None,
    ) -> torch.Tensor:  # type: ignore[override]
        weights = _solve(logits.detach(), k, num_iterations, tol, start)[1]
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_weights: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (weights,) = ctx.saved_tensors
        return topk_weight_grad(weights, grad_weights), None, None, None, None


def soft_topk(
    logits: torch.Tensor,
    k: int,
    num_iterations: int = 8,
    tol: float | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Soft top-k weights :math:`z_i = \sigma(\tau + x_i)` summing to ``k`` along the last dimension.

    This is exactly :math:`n \Gamma^\star_{\cdot 0}` of the two-anchor entropic OT problem with
    :math:`x_i = (C_{i1} - C_{i0}) / \varepsilon` (module docstring). Larger logits get larger
    weights.

    Args:
        logits: Scores :math:`x`, shape ``(..., n)``.
        k: Number of selected elements.
        num_iterations: Maximum number of solver steps.
        tol: Optional relative tolerance for an early exit (eager mode only).
        start: Optional first iterate of the threshold, ``(..., 1)`` (treated as a constant).

    Returns:
        Weights in ``(0, 1)``, shape ``(..., n)``, each row summing to ``k``.
    """
    start = None if start is None else start.detach()
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SoftTopKFunction.apply(logits, k, num_iterations, tol, start)
    return _solve(logits, k, num_iterations, tol, start)[1]


def sharp_start(top_logits: torch.Tensor, k: int) -> torch.Tensor:
    r"""Threshold midway between the ``k``-th and ``(k+1)``-th largest logits.

    There :math:`\sigma` splits those two logits symmetrically around 1/2, which is close to the
    root whenever the selection is sharp, so Newton starts in its quadratic regime.

    Args:
        top_logits: The ``k + 1`` largest logits of each row, in decreasing order, ``(..., k + 1)``.
        k: Number of selected elements.

    Returns:
        Start ``(..., 1)``.
    """
    return -0.5 * (top_logits[..., k - 1 : k] + top_logits[..., k : k + 1])


class LogitMap(NamedTuple):
    r"""Affine map from distances to logits, :math:`x = a - b (d - c)`, with detached coefficients.

    Attributes:
        offset: :math:`a`, broadcastable to the distances.
        slope: :math:`b > 0`, broadcastable to the distances.
        shift: :math:`c`, broadcastable to the distances.
        start: First iterate of the threshold search ``(..., 1)``, or ``None`` for the uniform start.
    """

    offset: torch.Tensor
    slope: torch.Tensor
    shift: torch.Tensor
    start: torch.Tensor | None

    def __call__(self, distances: torch.Tensor) -> torch.Tensor:
        """Logits of ``distances``."""
        return self.offset - (distances - self.shift) * self.slope


def reference_logit_map(d_min: torch.Tensor, d_max: torch.Tensor, epsilon: float) -> LogitMap:
    r"""Logit map of the ``"reference"`` mode from each image's extreme distances.

    :math:`\max_d \max(d^2, (d - 1)^2)` over an image is reached at its smallest or largest distance
    (both functions are convex), so the two extremes give the normaliser :math:`M` exactly.

    Args:
        d_min: Smallest distance of each image, ``(B, 1, 1)``.
        d_max: Largest distance of each image, ``(B, 1, 1)``.
        epsilon: Entropic regularisation.

    Returns:
        The map :math:`x = (1 - 2 d) / (M \varepsilon)`.
    """
    cost_scale = torch.stack([d_max.square(), (d_max - 1.0).square(), (d_min - 1.0).square()]).amax(dim=0)
    inverse = 1.0 / (cost_scale * epsilon)
    return LogitMap(inverse, 2.0 * inverse, torch.zeros_like(inverse), None)


def sharp_logit_map(nearest: torch.Tensor, k: int, epsilon: float) -> LogitMap:
    r"""Logit map of the ``"sharp"`` mode from each row's ``k + 1`` smallest distances.

    Args:
        nearest: The ``k + 1`` smallest distances of each row, increasing, ``(..., k + 1)``.
        k: Number of selected elements.
        epsilon: Entropic regularisation.

    Returns:
        The map :math:`x = (1 - 2 (d - d_{(1)}) / (d_{(k+1)} - d_{(1)})) / \varepsilon` with the start
        of :func:`sharp_start`.
    """
    shift = nearest[..., :1]
    slope = 2.0 / ((nearest[..., -1:] - shift).clamp_min(_SHARP_SCALE_FLOOR) * epsilon)
    offset = torch.full_like(shift, 1.0 / epsilon)
    mapping = LogitMap(offset, slope, shift, None)
    return mapping._replace(start=sharp_start(mapping(nearest), k))


def logit_map(distances: torch.Tensor, mode: TopKMode, k: int, epsilon: float) -> LogitMap:
    """Logit map of a soft mode for a full ``(B, T, N)`` distance tensor (see :func:`selection_logits`)."""
    distances = distances.detach()
    if mode == "reference":
        return reference_logit_map(
            distances.amin(dim=(1, 2), keepdim=True), distances.amax(dim=(1, 2), keepdim=True), epsilon
        )
    if mode == "sharp":
        return sharp_logit_map(torch.topk(distances, k + 1, dim=-1, largest=False).values, k, epsilon)
    msg = f"selection_logits has no soft form for mode {mode!r}"
    raise ValueError(msg)


def selection_logits(distances: torch.Tensor, mode: TopKMode, k: int, epsilon: float) -> torch.Tensor:
    r"""Turn distances into soft top-k logits that favour the ``k`` smallest distances.

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
        Logits of shape ``(B, T, N)``.
    """
    return logit_map(distances, mode, k, epsilon)(distances)


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


class SoftTopK(nn.Module):
    """Nearest-centre weights ``Z`` for ADFA: soft (reference/sharp OT) or hard top-k.

    Args:
        k: Number of nearest centres ``K``.
        mode: ``"reference"``, ``"sharp"`` or ``"hard"``.
        epsilon: Entropic regularisation of the OT problem.
        num_iterations: Maximum solver steps; default :data:`MAX_SOLVER_STEPS` of the mode.
    """

    def __init__(
        self, k: int = 3, mode: TopKMode = "reference", epsilon: float = 0.1, num_iterations: int | None = None
    ) -> None:
        super().__init__()
        if mode not in TOPK_MODES:
            msg = f"topk_mode must be one of {TOPK_MODES}, got {mode!r}"
            raise ValueError(msg)
        if k < 1:
            msg = f"the number of nearest centres must be >= 1, got {k}"
            raise ValueError(msg)
        self.k = k
        self.mode = mode
        self.epsilon = epsilon
        # Also the exact step count of exported graphs, which cannot exit early.
        self.num_iterations = MAX_SOLVER_STEPS[mode] if num_iterations is None else num_iterations

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        """Compute the weights.

        Args:
            distances: Shape ``(B, T, N)``: distance of each patch to each centre.

        Returns:
            Weights of shape ``(B, T, N)``; each ``(b, t)`` row sums to ``K``.
        """
        if self.mode == "hard":
            return hard_topk(distances, self.k)
        to_logits = logit_map(distances, self.mode, self.k, self.epsilon)
        return soft_topk(to_logits(distances), self.k, self.num_iterations, start=to_logits.start)

    def extra_repr(self) -> str:
        return f"k={self.k}, mode={self.mode!r}, epsilon={self.epsilon}, num_iterations={self.num_iterations}"


# Elements of one chunk of the patch-by-centre matrix: small enough for the per-chunk passes of the
# threshold search to stay in cache, large enough for the Python overhead per chunk to vanish.
CHUNK_ELEMENTS = 1 << 20


class _ScoreState(NamedTuple):
    """What the backward pass of :class:`_NearestCenterScores` needs, per chunk of patch rows.

    In the soft modes the weights of chunk ``i`` are ``sigmoid(betas[i] - slope * distances[i])``.
    """

    bounds: list[tuple[int, int]]
    distances: list[torch.Tensor]
    slope: torch.Tensor | None
    betas: list[torch.Tensor]
    clamped: list[bool]
    indices: torch.Tensor | None
    values: torch.Tensor | None


def _chunk_bounds(num_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows_per_chunk, num_rows)) for start in range(0, num_rows, rows_per_chunk)]


def _rows(value: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a per-row ``(B, T, 1)`` coefficient; per-image ``(B, 1, 1)`` ones are returned whole."""
    return value if value.shape[1] == 1 else value[:, start:stop]


def _chunk_weights(beta: torch.Tensor, distances: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    r"""Weights :math:`\sigma(\beta - b d)` of a chunk, with the argument floored at :math:`\log\sqrt{\text{tiny}}`.

    The floor changes weights below :math:`\sqrt{\text{tiny}}` (about 1e-19 in float32), far below the
    precision of any row sum, and keeps both the sigmoid off its slow overflow path and the squared
    weights of the Newton slope out of the subnormal range, which together slow the sharp mode's widely
    spread logits several-fold on CPU.
    """
    floor = 0.5 * math.log(torch.finfo(distances.dtype).tiny)
    return torch.addcmul(beta, distances, slope, value=-1.0).clamp_min_(floor).sigmoid_()


def _score_forward(
    patch_operand: torch.Tensor,
    center_operand: torch.Tensor,
    topk: SoftTopK,
    euclidean: bool,
    rows_per_chunk: int,
    tol: float | None,
) -> tuple[torch.Tensor, _ScoreState]:
    r"""Patch scores ``(B, T)`` chunk by chunk, and the state for the backward pass.

    The logits :math:`x = a - b (d - c)` of :class:`LogitMap` are never materialised: the search runs
    on :math:`\beta = \tau + a + b c`, so that every step costs one fused multiply-add and one sigmoid
    over the chunk, and the bracket and uniform start come from each row's extreme and mean distance.
    """
    bounds = _chunk_bounds(patch_operand.shape[1], rows_per_chunk)
    chunks = (operand_distances(patch_operand[:, a:b], center_operand, euclidean) for a, b in bounds)
    if topk.mode == "hard":
        values, indices = zip(*(torch.topk(chunk, topk.k, dim=-1, largest=False) for chunk in chunks), strict=True)
        values, indices = torch.cat(values, dim=1), torch.cat(indices, dim=1)
        return values.sum(dim=-1), _ScoreState(bounds, [], None, [], [], indices, values)
    distances = list(chunks)
    d_min = torch.cat([chunk.amin(dim=-1, keepdim=True) for chunk in distances], dim=1)
    d_max = torch.cat([chunk.amax(dim=-1, keepdim=True) for chunk in distances], dim=1)
    if topk.mode == "reference":
        mapping = reference_logit_map(d_min.amin(dim=1, keepdim=True), d_max.amax(dim=1, keepdim=True), topk.epsilon)
    elif topk.mode == "sharp":
        nearest = torch.cat([torch.topk(chunk, topk.k + 1, dim=-1, largest=False).values for chunk in distances], 1)
        mapping = sharp_logit_map(nearest, topk.k, topk.epsilon)
    else:
        msg = f"unknown top-k mode {topk.mode!r}"
        raise ValueError(msg)
    logit_ratio = math.log(topk.k / (center_operand.shape[0] - topk.k))
    slope = mapping.slope
    intercept = mapping.offset + mapping.shift * slope  # x = intercept - slope * d
    lower, upper = logit_ratio + slope * d_min, logit_ratio + slope * d_max
    scores, betas = [], []
    for (a, b), chunk in zip(bounds, distances, strict=True):
        row_slope = _rows(slope, a, b)
        if mapping.start is None:
            start = logit_ratio + row_slope * chunk.mean(dim=-1, keepdim=True)
        else:
            start = mapping.start[:, a:b] + _rows(intercept, a, b)
        beta, weights = newton_threshold(
            lambda beta, chunk=chunk, row_slope=row_slope: _chunk_weights(beta, chunk, row_slope),
            topk.k,
            start,
            lower[:, a:b],
            upper[:, a:b],
            topk.num_iterations,
            tol,
        )
        scores.append((weights * chunk).sum(dim=-1))
        betas.append(beta)
    zero = math.sqrt(EUCLIDEAN_EPS) if euclidean else 0.0  # the distance of a clamped squared distance
    clamped = [bool((d_min[:, a:b] <= zero).any()) if may_exit_early() else True for a, b in bounds]
    return torch.cat(scores, dim=1), _ScoreState(bounds, distances, slope, betas, clamped, None, None)


def _chain_to_squared(
    grad_distances: torch.Tensor, distances: torch.Tensor, euclidean: bool, clamped: bool
) -> torch.Tensor:
    """Turn gradients by the distances into gradients by the clamped squared distances, in place."""
    if euclidean:
        grad_distances.mul_(0.5).div_(distances)
    if not clamped:
        return grad_distances
    return grad_distances.masked_fill_(distances <= (math.sqrt(EUCLIDEAN_EPS) if euclidean else 0.0), 0.0)


class _NearestCenterScores(torch.autograd.Function):
    """Fused ``distances -> top-k weights -> weighted sum`` with a chunked, recomputing backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        patches: torch.Tensor,
        centers: torch.Tensor,
        patch_scale: torch.Tensor | None,
        topk: SoftTopK,
        euclidean: bool,
        rows_per_chunk: int,
        tol: float | None,
    ) -> torch.Tensor:  # type: ignore[override]
        patch_operand, center_operand = distance_operands(patches, centers, patch_scale)
        scores, state = _score_forward(patch_operand, center_operand, topk, euclidean, rows_per_chunk, tol)
        ctx.save_for_backward(patches)
        ctx.patch_scale, ctx.center_operand, ctx.state, ctx.euclidean = patch_scale, center_operand, state, euclidean
        return scores

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_scores: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (patches,) = ctx.saved_tensors
        state: _ScoreState = ctx.state
        center_operand: torch.Tensor = ctx.center_operand
        channels = patches.shape[-1]
        grad_patches = torch.empty_like(patches)
        for index, (a, b) in enumerate(state.bounds):
            row_grad = grad_scores[:, a:b, None]
            if state.indices is not None:
                grad_values = _chain_to_squared(
                    row_grad.expand_as(state.values[:, a:b]).clone(), state.values[:, a:b], ctx.euclidean, True
                )
                selected = center_operand[state.indices[:, a:b]]  # (B, t, K, D' + 2)
                projected = (grad_values.unsqueeze(-2) @ selected).squeeze(-2)
            else:
                # s = sum_j z_j d_j with x_j = intercept - slope * d_j: ds/dd_j = z_j - slope * (dz/dx)^T d.
                distances = state.distances[index]
                row_slope = _rows(state.slope, a, b)
                weights = _chunk_weights(state.betas[index], distances, row_slope)
                grad_distances = weights.addcmul_(topk_weight_grad(weights, distances), row_slope, value=-1.0)
                grad_distances = _chain_to_squared(
                    grad_distances.mul_(row_grad), distances, ctx.euclidean, state.clamped[index]
                )
                projected = grad_distances @ center_operand
            grad_patches[:, a:b] = projected[..., :channels] + 2.0 * patches[:, a:b] * projected[..., channels:-1]
        if ctx.patch_scale is not None:
            grad_patches *= ctx.patch_scale
        return grad_patches, None, None, None, None, None, None


def nearest_center_scores(
    patches: torch.Tensor,
    centers: torch.Tensor,
    distance: PatchCenterDistance,
    topk: SoftTopK,
    chunk_elements: int = CHUNK_ELEMENTS,
    tol: float | None = None,
) -> torch.Tensor:
    r"""ADFA's patch scores :math:`s_t = Z_t^\top D(p_t, C)`, fused and chunked.

    Equal (values and gradients with respect to ``patches``) to
    ``(topk(distance(patches, centers)) * distance(patches, centers)).sum(-1)``, but it never holds
    more than one ``(B, T, N)`` tensor: the distances come from one matmul per chunk of patch rows,
    the threshold search runs on cache-sized chunks, and the backward pass recomputes the weights
    from the stored distances and one threshold per row, then returns the gradient in one more
    matmul per chunk. In hard mode only the ``K`` selected distances are kept. The centres get no
    gradient (they are a fixed bank).

    Args:
        patches: Descriptors, shape ``(B, T, D')``.
        centers: Centre bank, shape ``(N, D')``.
        distance: Distance variant.
        topk: Top-k operator (mode, ``K``, epsilon, maximum solver steps).
        chunk_elements: Target number of elements of one ``(B, t, N)`` chunk.
        tol: Relative tolerance of the threshold search's early exit; default
            :func:`default_tolerance` of the dtype. The exit is skipped while tracing or exporting.

    Returns:
        Scores of shape ``(B, T)``.
    """
    if centers.requires_grad:
        msg = "nearest_center_scores treats the centre bank as constant; detach the centres"
        raise ValueError(msg)
    tol = default_tolerance(patches.dtype) if tol is None else tol
    # An exported graph takes any batch size, so its chunks must not depend on it: there the budget is per image.
    batch = patches.shape[0] if may_exit_early() else 1
    rows_per_chunk = max(1, chunk_elements // (batch * centers.shape[0]))
    patch_scale = distance.patch_scale(patches, centers)
    euclidean = distance.mode == "euclidean"
    if torch.is_grad_enabled() and patches.requires_grad:
        return _NearestCenterScores.apply(patches, centers, patch_scale, topk, euclidean, rows_per_chunk, tol)
    patch_operand, center_operand = distance_operands(patches, centers, patch_scale)
    return _score_forward(patch_operand, center_operand, topk, euclidean, rows_per_chunk, tol)[0]
