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
is (:func:`reference_logit_map`, :func:`sharp_logit_map`).

The operator runs inside the fused patch scoring of :mod:`anomalib_adfa.patch_scoring`; the plain, unfused
forms it is checked against are in :mod:`anomalib_adfa.reference`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

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

# Steps of the sharp start's search on the few nearest logits (cheap: a handful of elements per row).
SUBSET_SOLVER_STEPS = 12


_SHARP_SCALE_FLOOR = 1e-12


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative residual at which the threshold search stops early: a few ulps of ``k`` in ``dtype``."""
    return 64.0 * torch.finfo(dtype).eps


def may_exit_early() -> bool:
    """Whether data-dependent early exits are allowed (not while tracing, exporting or compiling)."""
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


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


def sigmoid_sums(logits: torch.Tensor, tau: torch.Tensor) -> Evaluation[torch.Tensor]:
    r"""Evaluate :func:`newton_threshold`'s sums on materialised logits: the plain searches use it.

    Args:
        logits: :math:`x`, shape ``(..., n)``.
        tau: Thresholds, ``(..., 1)``.

    Returns:
        The two sums, each ``(..., 1)``, and the weights :math:`w = \sigma(x + \tau)`, ``(..., n)``.
    """
    weights = torch.sigmoid(logits + tau)
    slopes = torch.addcmul(weights, weights, weights, value=-1.0)
    return weights.sum(dim=-1, keepdim=True), slopes.sum(dim=-1, keepdim=True), weights


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
    callers pick the cheapest way to evaluate it (:mod:`anomalib_adfa.chunk_kernels` does it in one pass).
    Each step is :func:`newton_step`. With ``tol`` the loop stops as soon as :math:`\max |F| \le tol \cdot k`
    and returns what it has just evaluated, so no pass is spent on a step that is not needed; without it (and
    while tracing or exporting) it makes exactly ``num_iterations`` steps and a final evaluation.

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
    check = tol is not None and may_exit_early()
    for step in range(num_iterations + 1):
        weight_sum, slope_sum, payload = evaluate(tau)
        residual = weight_sum - k
        if step == num_iterations or (check and bool(residual.abs().max() <= tol * k)):
            break
        tau, lower, upper = newton_step(tau, residual, slope_sum, lower, upper)
    return tau, payload


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


def moment_start(moments: torch.Tensor, k: int, n: int, num_iterations: int = 4) -> torch.Tensor:
    r"""Threshold start of the ``"reference"`` mode from the first four moments of each row's logit offsets.

    Write the weights as :math:`\sigma(u + \delta_i)` with offsets :math:`\delta_i` of raw moments
    :math:`M_j = \frac{1}{n}\sum_i \delta_i^j` and central moments :math:`V_j` (:math:`V_1 = 0`).
    Taylor-expanding each weight around :math:`v = u + M_1`,

    .. math::

        \frac{F + k}{n} \approx \sum_{j=0}^{4} \sigma^{(j)}(v) \frac{V_j}{j!}, \qquad
        \sigma' = p = \sigma(1 - \sigma),\ \sigma^{(2)} = p (1 - 2\sigma),\
        \sigma^{(3)} = p (1 - 6\sigma + 6\sigma^2),\ \sigma^{(4)} = p (1 - 2\sigma)(1 - 12\sigma + 12\sigma^2),

    and a few scalar Newton steps on this expansion, from the uniform start :math:`v = \operatorname{logit}(k/n)`
    (exact for equal logits), give its root :math:`u_0 = v - M_1`. The error is of fifth order in the spread of
    the offsets, which the reference normalisation keeps small, so the first evaluation of the full rows
    usually meets the tolerance.

    Args:
        moments: :math:`[M_1, M_2, M_3, M_4]` per row, ``(..., 4)``.
        k: Number of selected elements.
        n: Number of elements per row.
        num_iterations: Newton steps on the expansion (each a handful of operations per row).

    Returns:
        :math:`u_0`, ``(..., 1)``.
    """
    m1, m2, m3, m4 = moments.unbind(dim=-1)
    # Expand around the mean offset: central moments (the first is 0).
    v2 = m2 - m1.square()
    v3 = m3 - 3.0 * m1 * m2 + 2.0 * m1.pow(3)
    v4 = m4 - 4.0 * m1 * m3 + 6.0 * m1.square() * m2 - 3.0 * m1.pow(4)
    target = k / n
    u = torch.full_like(m1, math.log(k / (n - k)))  # u + M_1, the uniform start
    for _ in range(num_iterations):
        s = torch.sigmoid(u)
        p = s * (1.0 - s)
        c2, c3 = 1.0 - 2.0 * s, 1.0 - 6.0 * s + 6.0 * s * s
        c4 = c2 * (1.0 - 12.0 * s + 12.0 * s * s)
        c5 = 1.0 - 30.0 * s + 150.0 * s.square() - 240.0 * s.pow(3) + 120.0 * s.pow(4)
        value = s + p * (c2 * v2 / 2.0 + c3 * v3 / 6.0 + c4 * v4 / 24.0) - target
        slope = p * (1.0 + c3 * v2 / 2.0 + c4 * v3 / 6.0 + c5 * v4 / 24.0)
        u = u - value / slope.clamp_min(torch.finfo(u.dtype).tiny)
    return (u - m1).unsqueeze(-1)


def nearest_subset_start(
    top_logits: torch.Tensor, k: int, num_iterations: int, tol: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Threshold start of the ``"sharp"`` mode: the root for the ``m > k`` largest logits alone, and an upper bound.

    Leaving out the other logits removes positive terms from :math:`F`, so the subset's root lies above the full
    one, by the little mass the left-out terms carry when the selection is sharp. The bound: at the full root
    the ``k + 1`` largest logits have weights of at least :math:`z_{(k+1)}` and sum to at most ``k``, so
    :math:`z_{(k+1)} \le k / (k + 1)`, i.e. :math:`\tau \le \log k - x_{(k+1)}`; it does not depend on how
    exactly the subset's root is found.

    Args:
        top_logits: The ``m`` largest logits of each row, in decreasing order, ``(..., m)``.
        k: Number of selected elements, ``k < m``.
        num_iterations: Step budget of the subset's search (from :func:`sharp_start`).
        tol: Its relative tolerance, or ``None``.

    Returns:
        Start and upper bound of :math:`\tau`, each ``(..., 1)``.
    """
    logit_ratio = math.log(k / (top_logits.shape[-1] - k))
    lower = logit_ratio - top_logits[..., :1]
    upper = logit_ratio - top_logits[..., -1:]

    evaluate = functools.partial(sigmoid_sums, top_logits)
    start = newton_threshold(evaluate, k, sharp_start(top_logits, k), lower, upper, num_iterations, tol)[0]
    return start, math.log(k) - top_logits[..., k : k + 1]
