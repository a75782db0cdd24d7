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

Costs used by ADFA
------------------
For distances :math:`d_i \ge 0` and anchors 0 and 1 the cost is
:math:`C_{ia} = (d_i - a)^2 / M`, so :math:`x_i = (1 - 2 d_i) / (M \varepsilon)`: anchor 0 takes
the ``K`` *smallest* distances, and :math:`z` is a logistic threshold on the distances with
temperature :math:`M \varepsilon / 2`. The normaliser :math:`M` decides how sharp the selection
is (:func:`~anomalib_adfa.scoring.logits.reference_logit_map`,
:func:`~anomalib_adfa.scoring.logits.sharp_logit_map`).

Weights and slopes in one formula
---------------------------------
Every evaluation of :math:`z` and :math:`s` in the package goes through :func:`logistic_weights`
(the plain backend here, the fused backend's chunk passes in :mod:`anomalib_adfa.scoring.kernels`,
compiled from it by ``torch.compile``; no other code restates it). With the argument :math:`a_j = \tau + x_j`
clamped at :math:`\ell = \log\sqrt{\text{tiny}}` (:func:`argument_floor`) and :math:`e_j = \exp(-a_j)`,

.. math::

    z_j = \frac{1}{1 + e_j}, \qquad s_j = z_j (1 - z_j) = e_j z_j^2 ,

so one exponential and one reciprocal give both, and :math:`s_j` has no cancellation where
:math:`z_j` is close to 1. :math:`e_j` is computed as :math:`2^{-a_j \log_2 e}`: Inductor's CPU
heuristics store any ``exp`` or ``sigmoid`` result that feeds more than one sum (a full write and
re-read of the chunk), while ``exp2`` stays in registers, so the fused row sums cost one traversal.
The extra rounding of the product :math:`a_j \log_2 e` is below 4e-7 relative on :math:`e_j` for
the arguments that carry weight (:math:`|a_j| < 16`). The gradient is likewise written once,
:func:`topk_weight_grad`.

This module is the operator; :mod:`anomalib_adfa.scoring.plain` runs it on the full distance tensor
and :mod:`anomalib_adfa.scoring.fused` chunk by chunk.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

T = TypeVar("T")

TopKMode = Literal["reference", "sharp", "hard"]

TOPK_MODES: tuple[str, ...] = ("reference", "sharp", "hard")

# Newton steps per mode: eager code stops earlier at tolerance, exported graphs run exactly these.
# From the starts the fused scoring uses (moment_start, nearest_subset_start) the first evaluation
# meets the float32 tolerance on nearly every row; the rare others took at most 2 more steps in
# sharp mode on BrainMRI batches (from the midpoint of the K-th and (K+1)-th logits alone: 3-4).
# Hard mode has no search.
MAX_SOLVER_STEPS: dict[str, int] = {"reference": 4, "sharp": 6, "hard": 0}

_LOG2_E = 1.0 / math.log(2.0)


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative residual at which the threshold search stops early: a few ulps of ``k`` in ``dtype``."""
    return 64.0 * torch.finfo(dtype).eps


@dataclass(frozen=True)
class TopKSettings:
    """What the operator needs besides the distances: ``K``, the mode, epsilon and the solver's step budget.

    Args:
        k: Number of nearest centres ``K``.
        mode: ``"reference"`` (the published normalisation), ``"sharp"`` (per-patch scale) or ``"hard"``.
        epsilon: Entropic regularisation of the OT problem.
        num_iterations: Maximum threshold-search steps; ``None``: :data:`MAX_SOLVER_STEPS` of the mode.
            Eager code stops earlier at tolerance; exported graphs run exactly this many.

    Raises:
        ValueError: If ``mode`` is unknown or ``k < 1``.
    """

    k: int = 3
    mode: TopKMode = "reference"
    epsilon: float = 0.1
    num_iterations: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in TOPK_MODES:
            msg = f"topk_mode must be one of {TOPK_MODES}, got {self.mode!r}"
            raise ValueError(msg)
        if self.k < 1:
            msg = f"the number of nearest centres must be >= 1, got {self.k}"
            raise ValueError(msg)

    @property
    def max_steps(self) -> int:
        """Step budget of the threshold search."""
        return MAX_SOLVER_STEPS[self.mode] if self.num_iterations is None else self.num_iterations


def argument_floor(dtype: torch.dtype) -> float:
    r"""Lower bound :math:`\ell = \log\sqrt{\text{tiny}}` of the sigmoid argument (about -43.7 in float32).

    The floor changes weights below :math:`\sqrt{\text{tiny}}` (about 1e-19 in float32), far below the
    precision of any row sum, and keeps the squared weights of the Newton slope out of the subnormal range,
    which would slow the sharp mode's widely spread logits several-fold on CPU.
    """
    return 0.5 * math.log(torch.finfo(dtype).tiny)


def logistic_weights(arguments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Weights :math:`z = \sigma(a)` and slopes :math:`s = z (1 - z)` of the module docstring, the one formula.

    Args:
        arguments: :math:`a = \tau + x`, any shape.

    Returns:
        ``(z, s)``, each of the shape of ``arguments``.
    """
    clamped = torch.clamp_min(arguments, argument_floor(arguments.dtype))
    decay = torch.exp2(clamped * -_LOG2_E)
    weights = 1.0 / (1.0 + decay)
    return weights, decay * weights * weights


def slope_mean(weighted_sum: torch.Tensor, slope_sum: torch.Tensor) -> torch.Tensor:
    r""":math:`\bar g = \sum_i g_i s_i / \sum_i s_i` of the backward pass from its two sums (guarded against 0)."""
    return weighted_sum / slope_sum.clamp_min(torch.finfo(slope_sum.dtype).tiny)


def topk_weight_grad(slopes: torch.Tensor, grad_weights: torch.Tensor, mean_grad: torch.Tensor) -> torch.Tensor:
    r"""Implicit-function vector-Jacobian product :math:`s_j (g_j - \bar g)` of the module docstring, the one formula.

    Args:
        slopes: :math:`s = z (1 - z)`, shape ``(..., n)``.
        grad_weights: :math:`g = \partial L / \partial z`, shape ``(..., n)``.
        mean_grad: :math:`\bar g` (:func:`slope_mean`), shape ``(..., 1)``.

    Returns:
        :math:`\partial L / \partial x`, shape ``(..., n)``.
    """
    return slopes * (grad_weights - mean_grad)


def newton_step(
    tau: torch.Tensor, residual: torch.Tensor, slope: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""One safeguarded Newton step on :math:`F` from its value and slope at ``tau``.

    The bracket shrinks with the sign of :math:`F`; a Newton step leaving it is replaced by its midpoint.

    Args:
        tau: Current thresholds, ``(..., 1)``.
        residual: :math:`F(\tau) = \sum_i w_i - k`, ``(..., 1)``.
        slope: :math:`F'(\tau) = \sum_i w_i (1 - w_i)`, ``(..., 1)``.
        lower: Lower bound of the root, ``(..., 1)``.
        upper: Upper bound of the root, ``(..., 1)``.

    Returns:
        The next thresholds and the new bracket.
    """
    lower = torch.where(residual < 0, tau, lower)
    upper = torch.where(residual > 0, tau, upper)
    newton = tau - residual / slope.clamp_min(torch.finfo(tau.dtype).tiny)
    inside = (newton >= lower) & (newton <= upper)
    return torch.where(inside, newton, 0.5 * (lower + upper)), lower, upper


Evaluation = tuple[torch.Tensor, torch.Tensor, T]


def sigmoid_sums(logits: torch.Tensor, tau: torch.Tensor) -> Evaluation[tuple[torch.Tensor, torch.Tensor]]:
    r"""Evaluate :func:`newton_threshold`'s sums on materialised logits: the plain searches use it.

    Args:
        logits: :math:`x`, shape ``(..., n)``.
        tau: Thresholds, ``(..., 1)``.

    Returns:
        The two sums, each ``(..., 1)``, and the weights and slopes of :func:`logistic_weights`, each ``(..., n)``.
    """
    weights, slopes = logistic_weights(logits + tau)
    return weights.sum(dim=-1, keepdim=True), slopes.sum(dim=-1, keepdim=True), (weights, slopes)


def newton_threshold(
    evaluate: Callable[[torch.Tensor], Evaluation[T]],
    k: int,
    tau: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    num_iterations: int,
    tol: float | None,
) -> tuple[torch.Tensor, T]:
    r"""Safeguarded Newton search of the root of :math:`F(\tau) = \sum_i w_i(\tau) - k`.

    ``evaluate(tau)`` must return :math:`\sum_i w_i`, :math:`\sum_i w_i (1 - w_i)` (both ``(..., 1)``) and
    whatever else the caller wants at that threshold, for :math:`w_i = \sigma(\tau + x_i)` with fixed logits;
    callers pick the cheapest way to evaluate it (:mod:`anomalib_adfa.scoring.kernels` does it in one pass).
    Each step is :func:`newton_step`. With ``tol`` the loop stops as soon as :math:`\max |F| \le tol \cdot k`
    and returns what it has just evaluated, so no pass is spent on a step that is not needed; with ``tol=None``
    (what callers pass while tracing or exporting) it makes exactly ``num_iterations`` steps and a final
    evaluation.

    Args:
        evaluate: Map from thresholds ``(..., 1)`` to ``(weight sum, slope sum, payload)``.
        k: Number of selected elements.
        tau: Start, shape ``(..., 1)``.
        lower: Lower bound of the root, shape ``(..., 1)``.
        upper: Upper bound of the root, shape ``(..., 1)``.
        num_iterations: Maximum number of steps.
        tol: Relative tolerance for the early exit, or ``None`` for a fixed number of steps.

    Returns:
        Thresholds ``(..., 1)`` and the payload of ``evaluate`` at them.
    """
    for step in range(num_iterations + 1):
        weight_sum, slope_sum, payload = evaluate(tau)
        residual = weight_sum - k
        if step == num_iterations or (tol is not None and bool(residual.abs().max() <= tol * k)):
            break
        tau, lower, upper = newton_step(tau, residual, slope_sum, lower, upper)
    return tau, payload


def threshold_bracket(logits: torch.Tensor, k: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    r"""Return :math:`\operatorname{logit}(k/n)` and the bracket of :math:`\tau`, each ``(..., 1)``."""
    n = logits.shape[-1]
    if not 0 < k < n:
        msg = f"soft top-k needs 0 < k < n, got k={k} for n={n} elements"
        raise ValueError(msg)
    logit_ratio = math.log(k / (n - k))
    return logit_ratio, logit_ratio - logits.amax(dim=-1, keepdim=True), logit_ratio - logits.amin(dim=-1, keepdim=True)


def _solve(
    logits: torch.Tensor, k: int, num_iterations: int, tol: float | None, start: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Threshold, weights and slopes; see :func:`solve_threshold`."""
    logit_ratio, lower, upper = threshold_bracket(logits, k)
    tau = logit_ratio - logits.mean(dim=-1, keepdim=True) if start is None else start
    return newton_threshold(functools.partial(sigmoid_sums, logits), k, tau, lower, upper, num_iterations, tol)


def solve_threshold(
    logits: torch.Tensor,
    k: int,
    num_iterations: int = 8,
    tol: float | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Find :math:`\tau` with :math:`\sum_i \sigma(\tau + x_i) = k` along the last dimension.

    Safeguarded Newton (:func:`newton_threshold`) inside the bracket derived above, from the uniform start
    unless ``start`` is given.

    Args:
        logits: Scores :math:`x`, shape ``(..., n)``.
        k: Number of selected elements, ``0 < k < n``.
        num_iterations: Maximum number of Newton/bisection steps.
        tol: Optional relative tolerance on :math:`F` for an early exit (``None`` while tracing or exporting).
        start: Optional first iterate ``(..., 1)``; default: the uniform solution
            :math:`\operatorname{logit}(k/n) - \bar{x}`.

    Returns:
        Thresholds :math:`\tau`, shape ``(..., 1)``.
    """
    return _solve(logits, k, num_iterations, tol, start)[0]


class SoftTopK(torch.autograd.Function):
    """Soft top-k weights with the implicit-function-theorem backward (:func:`topk_weight_grad`)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        k: int,
        num_iterations: int,
        start: torch.Tensor | None,
    ) -> torch.Tensor:  # type: ignore[override]
        weights, slopes = _solve(logits.detach(), k, num_iterations, None, start)[1]
        ctx.save_for_backward(slopes)
        return weights

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_weights: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (slopes,) = ctx.saved_tensors
        mean_grad = slope_mean(torch.linalg.vecdot(grad_weights, slopes).unsqueeze(-1), slopes.sum(-1, keepdim=True))
        return topk_weight_grad(slopes, grad_weights, mean_grad), None, None, None


def soft_topk(logits: torch.Tensor, k: int, num_iterations: int = 8, start: torch.Tensor | None = None) -> torch.Tensor:
    r"""Soft top-k weights :math:`z_i = \sigma(\tau + x_i)` summing to ``k`` along the last dimension.

    This is exactly :math:`n \Gamma^\star_{\cdot 0}` of the two-anchor entropic OT problem with
    :math:`x_i = (C_{i1} - C_{i0}) / \varepsilon`. Larger logits get larger weights; the gradient is the
    implicit one of :class:`SoftTopK`. The search makes exactly ``num_iterations`` steps: no data-dependent exit,
    so it traces, exports, and runs on a GPU without waiting on the device.

    Args:
        logits: Scores :math:`x`, shape ``(..., n)``.
        k: Number of selected elements.
        num_iterations: Number of solver steps.
        start: Optional first iterate of the threshold, ``(..., 1)`` (treated as a constant).

    Returns:
        Weights in ``(0, 1)``, shape ``(..., n)``, each row summing to ``k``.
    """
    start = None if start is None else start.detach()
    if torch.is_grad_enabled() and logits.requires_grad:
        return SoftTopK.apply(logits, k, num_iterations, start)
    return _solve(logits, k, num_iterations, None, start)[1][0]
