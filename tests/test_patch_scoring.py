"""The fused, chunked patch scoring against the plain computation, and the distance modes."""

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_adfa.patch_scoring import DISTANCE_MODES, kl_weight, nearest_center_scores
from anomalib_adfa.reference import plain_distances, plain_scores, squared_distances
from anomalib_adfa.soft_topk import TOPK_MODES, TopKSettings


def adfa_like(batch: int, patches: int, channels: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Descriptors scattered around one centre per position, as after ADFA's centre initialisation."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(patches, channels, generator=generator, dtype=dtype)
    noise = torch.randn(batch, patches, channels, generator=generator, dtype=dtype)
    return (
        (centers + 0.5 * noise).requires_grad_(),
        centers,
        torch.randn(batch, patches, generator=generator, dtype=dtype),
    )


def values_and_grads(scores: torch.Tensor, patches: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    (grad,) = torch.autograd.grad(scores, patches, upstream)
    return scores.detach(), grad


@pytest.mark.parametrize("distance", DISTANCE_MODES)
@pytest.mark.parametrize("mode", TOPK_MODES)
def test_fused_scores_match_plain_float64(mode: str, distance: str) -> None:
    patches, centers, upstream = adfa_like(3, 49, 12, torch.float64, seed=0)
    topk = TopKSettings(3, mode, num_iterations=40)
    plain = values_and_grads(plain_scores(patches, centers, distance, topk), patches, upstream)
    # 500 elements per chunk: 3 patch rows of the 3 images, so 17 chunks with a short last one.
    fused_scores = nearest_center_scores(patches, centers, distance, topk, chunk_elements=500)
    fused = values_and_grads(fused_scores, patches, upstream)
    for ours, reference in zip(fused, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", TOPK_MODES)
def test_fused_scores_match_plain_float32_with_early_exit(mode: str) -> None:
    patches, centers, upstream = adfa_like(2, 196, 32, torch.float32, seed=1)
    topk = TopKSettings(3, mode)
    plain = values_and_grads(plain_scores(patches, centers, "kl_weighted", topk), patches, upstream)
    fused = values_and_grads(nearest_center_scores(patches, centers, "kl_weighted", topk), patches, upstream)
    for ours, reference in zip(fused, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=2e-4, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("mode", TOPK_MODES)
def test_chunked_equals_unchunked(mode: str) -> None:
    patches, centers, upstream = adfa_like(2, 36, 8, torch.float64, seed=2)
    distance, topk = "kl_weighted", TopKSettings(3, mode, num_iterations=40)
    row_by_row = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 1), patches, upstream)
    whole = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 10**9), patches, upstream)
    for ours, reference in zip(row_by_row, whole, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_fused_scores_without_gradient_match_and_patch_on_its_centre() -> None:
    patches, centers, upstream = adfa_like(2, 25, 6, torch.float64, seed=3)
    with torch.no_grad():
        patches[0, 4] = centers[4]  # a zero distance: the clamp at 0 is active for rounding errors
    topk, distance = TopKSettings(3, "reference", num_iterations=40), "squared"
    plain = values_and_grads(plain_scores(patches, centers, "squared", topk), patches, upstream)
    fused = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 50), patches, upstream)
    with torch.no_grad():
        inference = nearest_center_scores(patches, centers, distance, topk, 50)
    for ours, reference in zip((*fused, inference), (*plain, plain[0]), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_fused_scores_refuse_trainable_centres() -> None:
    patches, centers, _ = adfa_like(1, 9, 4, torch.float64, seed=4)
    with pytest.raises(ValueError, match="centre bank as constant"):
        nearest_center_scores(patches, centers.requires_grad_(), "kl_weighted", TopKSettings())


def test_distance_modes() -> None:
    patches, centers = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    expected = torch.cdist(patches, centers.expand(2, -1, -1)).square()
    torch.testing.assert_close(squared_distances(patches, centers), expected)
    torch.testing.assert_close(plain_distances(patches, centers, "euclidean"), expected.sqrt(), atol=1e-6, rtol=0)
    kl = F.kl_div(patches.log_softmax(-1), centers.softmax(-1).expand(2, -1, -1), reduction="none").sum(dim=(1, 2))
    torch.testing.assert_close(kl_weight(patches, centers).view(2), kl)
    torch.testing.assert_close(plain_distances(patches, centers, "kl_weighted"), expected * kl.view(2, 1, 1))
    with pytest.raises(ValueError, match="distance must be one of"):
        plain_distances(patches, centers, "cosine")  # type: ignore[arg-type]
