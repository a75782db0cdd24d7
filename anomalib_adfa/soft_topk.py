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
is (see :func:`selection_logits`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

TopKMode = Literal["reference", "sharp", "hard"]
TOPK_MODES: tuple[str, ...] = ("reference", "sharp", "hard")

_SHARP_SCALE_FLOOR = 1e-12


def solve_threshold(logits: torch.Tensor, k: int, num_iterations: int = 8, tol: float | None = None) -> torch.Tensor:
    r"""Find :math:`\tau` with :math:`\sum_i \sigma(\tau + x_i) = k` along the last dimension.

    Safeguarded Newton: every iterate stays inside a bracket that shrinks with the sign of
    :math:`F`; a Newton step leaving the bracket is replaced by its midpoint. The loop has a
    fixed length unless ``tol`` is given, in which case it stops early once
    :math:`\max |F| \le tol \cdot k` (a data-dependent exit, so not used in exported graphs).

    Args:
        logits: Scores :math:`x`, shape ``(..., n)``.
        k: Number of selected elements, ``0 < k < n``.
        num_iterations: Maximum number of Newton/bisection steps.
        tol: Optional relative tolerance on :math:`F` for an early exit.

    Returns:
        Thresholds :math:`\tau`, shape ``(..., 1)``.
    """
    n = logits.shape[-1]
    if not 0 < k < n:
        msg = f"soft top-k needs 0 < k < n, got k={k} for n={n} elements"
        raise ValueError(msg)
    logit_ratio = math.log(k / (n - k))
    lower = logit_ratio - logits.amax(dim=-1, keepdim=True)
    upper = logit_ratio - logits.amin(dim=-1, keepdim=True)
    tau = logit_ratio - logits.mean(dim=-1, keepdim=True)
    for _ in range(num_iterations):
        weights = torch.sigmoid(tau + logits)
        residual = weights.sum(dim=-1, keepdim=True) - k
        slope = (weights * (1.0 - weights)).sum(dim=-1, keepdim=True)
        lower = torch.where(residual < 0, tau, lower)
        upper = torch.where(residual > 0, tau, upper)
        newton = tau - residual / slope.clamp_min(torch.finfo(logits.dtype).tiny)
        inside = (newton >= lower) & (newton <= upper)
        tau = torch.where(inside, newton, 0.5 * (lower + upper))
        if tol is not None and not torch.jit.is_tracing() and bool(residual.abs().max() <= tol * k):
            break
    return tau


class _SoftTopKFunction(torch.autograd.Function):
    """Soft top-k weights with the implicit-function-theorem backward derived in the module docstring."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, k: int, num_iterations: int, tol: float | None
    ) -> torch.Tensor:  # type: ignore[override]
        tau = solve_threshold(logits.detach(), k, num_iterations, tol)
        weights = torch.sigmoid(tau + logits)
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_weights: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (weights,) = ctx.saved_tensors
        slope = weights * (1.0 - weights)
        total = slope.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        mean_grad = (grad_weights * slope).sum(dim=-1, keepdim=True) / total
        return slope * (grad_weights - mean_grad), None, None, None


def soft_topk(logits: torch.Tensor, k: int, num_iterations: int = 8, tol: float | None = None) -> torch.Tensor:
    r"""Soft top-k weights :math:`z_i = \sigma(\tau + x_i)` summing to ``k`` along the last dimension.

    This is exactly :math:`n \Gamma^\star_{\cdot 0}` of the two-anchor entropic OT problem with
    :math:`x_i = (C_{i1} - C_{i0}) / \varepsilon` (module docstring). Larger logits get larger
    weights.

    Args:
        logits: Scores :math:`x`, shape ``(..., n)``.
        k: Number of selected elements.
        num_iterations: Maximum number of solver steps.
        tol: Optional relative tolerance for an early exit (eager mode only).

    Returns:
        Weights in ``(0, 1)``, shape ``(..., n)``, each row summing to ``k``.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SoftTopKFunction.apply(logits, k, num_iterations, tol)
    tau = solve_threshold(logits, k, num_iterations, tol)
    return torch.sigmoid(tau + logits)


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
    if mode == "reference":
        cost_scale = torch.maximum(distances.square(), (distances - 1.0).square()).amax(dim=(1, 2), keepdim=True)
        return (1.0 - 2.0 * distances) / (cost_scale.detach() * epsilon)
    if mode == "sharp":
        nearest = torch.topk(distances.detach(), k + 1, dim=-1, largest=False).values
        gap = (nearest[..., -1:] - nearest[..., :1]).clamp_min(_SHARP_SCALE_FLOOR)
        return (1.0 - 2.0 * (distances - nearest[..., :1]) / gap) / epsilon
    msg = f"selection_logits has no soft form for mode {mode!r}"
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


class SoftTopK(nn.Module):
    """Nearest-centre weights ``Z`` for ADFA: soft (reference/sharp OT) or hard top-k.

    Args:
        k: Number of nearest centres ``K``.
        mode: ``"reference"``, ``"sharp"`` or ``"hard"``.
        epsilon: Entropic regularisation of the OT problem.
        num_iterations: Solver steps; the default reaches float32 precision on ADFA's
            distances in every soft mode.
    """

    def __init__(
        self, k: int = 3, mode: TopKMode = "reference", epsilon: float = 0.1, num_iterations: int = 12
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
        self.num_iterations = num_iterations

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        """Compute the weights.

        Args:
            distances: Shape ``(B, T, N)``: distance of each patch to each centre.

        Returns:
            Weights of shape ``(B, T, N)``; each ``(b, t)`` row sums to ``K``.
        """
        if self.mode == "hard":
            return hard_topk(distances, self.k)
        logits = selection_logits(distances, self.mode, self.k, self.epsilon)
        return soft_topk(logits, self.k, self.num_iterations)

    def extra_repr(self) -> str:
        return f"k={self.k}, mode={self.mode!r}, epsilon={self.epsilon}, num_iterations={self.num_iterations}"
