"""The plain and the fused backend through the one interface the model uses, PatchScorer: same values and gradients."""

from collections.abc import Callable

import pytest
import torch

from anomalib_adfa.scoring import DISTANCE_MODES, TOPK_MODES, PatchScorer
from anomalib_adfa.scoring.fused import is_traced
from anomalib_adfa.scoring.scorer import resolve_backend

AdfaLike = Callable[..., tuple[torch.Tensor, ...]]


def scores_and_gradient(
    scorer: PatchScorer, patches: torch.Tensor, centers: torch.Tensor, upstream: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = scorer(patches, centers)
    (gradient,) = torch.autograd.grad(scores, patches, upstream)
    return scores.detach(), gradient


@pytest.mark.parametrize("distance", DISTANCE_MODES)
@pytest.mark.parametrize("mode", TOPK_MODES)
def test_backends_agree_in_float64(mode: str, distance: str, adfa_like: AdfaLike) -> None:
    patches, centers, upstream = adfa_like(3, 49, 12, torch.float64, seed=0)
    results = {
        backend: scores_and_gradient(
            PatchScorer(3, mode, distance=distance, num_iterations=40, backend=backend), patches, centers, upstream
        )
        for backend in ("plain", "fused")
    }
    for fused, plain in zip(results["fused"], results["plain"], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("distance", DISTANCE_MODES)
@pytest.mark.parametrize("mode", TOPK_MODES)
def test_backends_agree_in_float32_with_their_default_steps(mode: str, distance: str, adfa_like: AdfaLike) -> None:
    # The fused backend stops at the float32 tolerance, the plain one makes the mode's fixed number of steps.
    patches, centers, upstream = adfa_like(2, 196, 32, torch.float32, seed=1)
    plain = scores_and_gradient(PatchScorer(3, mode, distance=distance, backend="plain"), patches, centers, upstream)
    fused = scores_and_gradient(PatchScorer(3, mode, distance=distance, backend="fused"), patches, centers, upstream)
    for ours, reference in zip(fused, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=2e-4, atol=1e-5 * reference.abs().max().item())


def test_backends_agree_without_gradient(adfa_like: AdfaLike) -> None:
    patches, centers, _ = adfa_like(2, 25, 6, torch.float64, seed=2)
    with torch.no_grad():
        plain = PatchScorer(3, "reference", num_iterations=40, backend="plain")(patches, centers)
        fused = PatchScorer(3, "reference", num_iterations=40, backend="fused")(patches, centers)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)


def test_auto_is_fused_on_cpu_and_plain_elsewhere() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "fused"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "plain"
    assert resolve_backend("plain", torch.device("cpu")) == "plain"
    assert resolve_backend("fused", torch.device("cuda")) == "fused"
    assert "backend='auto'" in repr(PatchScorer())


def test_unknown_backend_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'plain', 'fused'\)"):
        PatchScorer(backend="gpu")  # type: ignore[arg-type]


def test_tracing_is_detected_once_at_the_entry() -> None:
    assert not is_traced()
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(is_traced())
        return x + 1

    torch.jit.trace(probe, (torch.zeros(2),), check_trace=False)
    assert seen == [True]
