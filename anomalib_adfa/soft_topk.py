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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

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
