"""The exact soft top-k against an independent Sinkhorn solver, its gradients and its modes."""

import math

import pytest
import torch

from anomalib_adfa.scoring.logits import moment_start, nearest_subset_start
from anomalib_adfa.scoring.plain import hard_topk, logit_map, topk_weights
from anomalib_adfa.scoring.soft_topk import TopKSettings, soft_topk, solve_threshold


def sinkhorn_plan(cost: torch.Tensor, k: int, epsilon: float, iterations: int = 5000) -> torch.Tensor:
    """Log-domain Sinkhorn for the two-anchor top-k problem, written from the OT definition.

    Args:
        cost: ``(n, 2)`` costs of moving each score to anchor 0 and anchor 1.
        k: Mass ``k / n`` goes to anchor 0.
        epsilon: Entropic regularisation.
        iterations: Number of alternating projections.

    Returns:
        The ``(n, 2)`` optimal plan.
    """
    n = cost.shape[0]
    log_mu = torch.full((n, 1), -math.log(n), dtype=cost.dtype)
    log_nu = torch.tensor([[math.log(k / n), math.log((n - k) / n)]], dtype=cost.dtype)
    f = torch.zeros((n, 1), dtype=cost.dtype)
    g = torch.zeros((1, 2), dtype=cost.dtype)
    for _ in range(iterations):
        f = epsilon * (log_mu - torch.logsumexp((g - cost) / epsilon, dim=1, keepdim=True))
        g = epsilon * (log_nu - torch.logsumexp((f - cost) / epsilon, dim=0, keepdim=True))
    return torch.exp((f + g - cost) / epsilon)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_sinkhorn(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    n, k, epsilon = 40, 3, 0.1
    distances = torch.rand(n, generator=generator, dtype=torch.float64) * 2.0
    cost = torch.stack([distances.square(), (distances - 1.0).square()], dim=1)
    cost = cost / cost.max()
    plan = sinkhorn_plan(cost, k, epsilon)
    weights = soft_topk(((cost[:, 1] - cost[:, 0]) / epsilon)[None], k, num_iterations=50)[0]
    torch.testing.assert_close(weights, n * plan[:, 0], rtol=0, atol=1e-6)
    # The same weights through ADFA's entry point (per-image cost normalisation).
    adfa_weights = topk_weights(distances.view(1, 1, n), TopKSettings(k, "reference", epsilon, num_iterations=50))
    torch.testing.assert_close(adfa_weights.view(n), n * plan[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_threshold_reaches_machine_precision(scale: float) -> None:
    logits = torch.randn(7, 500, dtype=torch.float64) * scale
    tau = solve_threshold(logits, 3, num_iterations=60)
    residual = torch.sigmoid(tau + logits).sum(dim=-1) - 3
    assert residual.abs().max() < 1e-10


def test_rows_sum_to_k_and_favour_large_logits() -> None:
    logits = torch.randn(4, 6, 100)
    weights = soft_topk(logits, 5, num_iterations=30)
    torch.testing.assert_close(weights.sum(-1), torch.full((4, 6), 5.0), rtol=0, atol=1e-4)
    order = logits.argsort(dim=-1)
    assert torch.all(weights.gather(-1, order).diff(dim=-1) >= -1e-7)


@pytest.mark.parametrize("scale", [0.05, 1.0, 20.0])
def test_gradcheck_implicit_backward(scale: float) -> None:
    logits = (torch.randn(3, 12, dtype=torch.float64) * scale).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: soft_topk(x, 3, num_iterations=60), (logits,))


@pytest.mark.parametrize("mode", ["reference", "sharp"])
def test_gradcheck_through_adfa_modes(mode: str) -> None:
    # Both modes divide by a detached, data-dependent scale (as the public code does), so finite
    # differences would also move the scale: check the gradient with the scale frozen at d0.
    d0 = torch.rand(2, 3, 15, dtype=torch.float64) * 4.0
    logits0 = logit_map(d0, mode, 3, 0.1)(d0)
    slope = (logits0[..., :1] - logits0[..., 1:2]) / (d0[..., 1:2] - d0[..., :1])  # d logits / d d
    offset = logits0 + slope * d0

    def weighted_distances(d: torch.Tensor) -> torch.Tensor:
        return (soft_topk(offset - slope * d, 3, num_iterations=60) * d).sum(-1)

    torch.testing.assert_close(offset - slope * d0, logits0)
    assert torch.autograd.gradcheck(weighted_distances, (d0.clone().requires_grad_(),))
    # The operator itself gives the same gradient as this frozen-scale function.
    d = d0.clone().requires_grad_()
    (topk_weights(d, TopKSettings(3, mode, 0.1, num_iterations=60)) * d).sum().backward()
    expected = d0.clone().requires_grad_()
    weighted_distances(expected).sum().backward()
    torch.testing.assert_close(d.grad, expected.grad)


def test_image_scores_do_not_depend_on_batch_mates() -> None:
    generator = torch.Generator().manual_seed(3)
    distances = torch.rand(5, 8, 64, generator=generator) * torch.tensor([1.0, 50.0, 0.1, 7.0, 1000.0]).view(5, 1, 1)
    for mode in ("reference", "sharp", "hard"):
        topk = TopKSettings(3, mode)
        batched = (topk_weights(distances, topk) * distances).sum(-1)
        alone = torch.cat([(topk_weights(d[None], topk) * d[None]).sum(-1) for d in distances])
        torch.testing.assert_close(batched, alone, rtol=1e-6, atol=0)


def test_sharp_mode_concentrates_on_the_k_nearest() -> None:
    n, k = 3136, 3
    distances = torch.randperm(n).float().view(1, 1, n) * 2.0 + 10.0
    weights = topk_weights(distances, TopKSettings(k, "sharp"))[0, 0]
    nearest = distances[0, 0].topk(k, largest=False).indices
    assert weights[nearest].sum() / k >= 0.95


def test_reference_mode_is_nearly_uniform_on_large_distances() -> None:
    # The published normalisation divides by the image's largest squared distance: a finding we keep.
    n, k = 3136, 3
    distances = 100.0 + torch.rand(1, 4, n) * 20.0
    weights = topk_weights(distances, TopKSettings(k, "reference"))
    assert torch.allclose(weights, torch.full_like(weights, k / n), rtol=0.1)


def test_hard_mode_selects_exactly_the_k_smallest() -> None:
    distances = torch.tensor([[[5.0, 1.0, 3.0, 0.5, 9.0]]])
    torch.testing.assert_close(hard_topk(distances, 2), torch.tensor([[[0.0, 1.0, 0.0, 1.0, 0.0]]]))
    assert topk_weights(distances, TopKSettings(2, "hard")).sum() == 2


def test_invalid_arguments_are_reported() -> None:
    with pytest.raises(ValueError, match="topk_mode"):
        TopKSettings(3, "soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0 < k < n"):
        solve_threshold(torch.zeros(1, 3), 3)
    with pytest.raises(ValueError, match="no soft logits"):
        logit_map(torch.zeros(1, 1, 4), "hard", 1, 0.1)  # type: ignore[arg-type]


def residual_at(logits: torch.Tensor, tau: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sigmoid(logits + tau).sum(dim=-1, keepdim=True) - k


@pytest.mark.parametrize("spread", [0.0, 1e-3, 0.05, 0.3])
def test_moment_start_is_exact_for_equal_logits_and_beats_the_uniform_start(spread: float) -> None:
    # Reference-mode logits x = a - b d: the offsets are -b (d - c); here a = 0 and c = 0.
    generator = torch.Generator().manual_seed(4)
    n, k, slope = 3136, 3, torch.tensor(2.0, dtype=torch.float64)
    distances = 1.0 + spread * torch.rand(6, n, generator=generator, dtype=torch.float64)
    logits = -slope * distances
    beta = moment_start(torch.stack([logits.pow(j).mean(-1) for j in range(1, 5)], -1), k, n)
    uniform = math.log(k / (n - k)) - logits.mean(-1, keepdim=True)
    moment_error, uniform_error = residual_at(logits, beta, k).abs(), residual_at(logits, uniform, k).abs()
    if spread == 0.0:
        assert moment_error.max() < 1e-12
    else:
        assert torch.all(moment_error < 0.01 * uniform_error)  # a fifth-order error instead of a second-order one


def test_nearest_subset_start_bounds_the_full_root_from_above() -> None:
    generator = torch.Generator().manual_seed(5)
    k = 3
    logits = torch.randn(40, 300, generator=generator, dtype=torch.float64) * 8.0
    top = logits.topk(8).values
    start, upper = nearest_subset_start(top, k, num_iterations=60, tol=1e-12)
    root = solve_threshold(logits, k, num_iterations=200)
    assert torch.all(root <= start + 1e-9)
    assert torch.all(start <= upper + 1e-9)
    torch.testing.assert_close(residual_at(top, start, k), torch.zeros_like(start), rtol=0, atol=1e-9)
