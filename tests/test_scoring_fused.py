"""The fused backend's parts: its chunks, searches, selection, memory and distance modes, against the plain forms."""

import math
from collections.abc import Callable

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_adfa.scoring import chunking, kernels, memory, modes, search
from anomalib_adfa.scoring.distances import DISTANCE_MODES, dense_distances, kl_weight
from anomalib_adfa.scoring.fused import nearest_center_scores
from anomalib_adfa.scoring.plain import plain_scores
from anomalib_adfa.scoring.selection import selected_directions, selection_block, smallest_distances
from anomalib_adfa.scoring.soft_topk import TOPK_MODES, TopKSettings, default_tolerance, solve_threshold

AdfaLike = Callable[..., tuple[torch.Tensor, ...]]


def values_and_grads(scores: torch.Tensor, patches: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    (grad,) = torch.autograd.grad(scores, patches, upstream)
    return scores.detach(), grad


@pytest.mark.parametrize("mode", TOPK_MODES)
def test_chunked_equals_unchunked(mode: str, adfa_like: AdfaLike) -> None:
    # With test_scoring_backends (plain equals fused in one chunk), chunked fused scores equal the plain ones.
    patches, centers, upstream = adfa_like(2, 36, 8, torch.float64, seed=2)
    distance, topk = "kl_weighted", TopKSettings(3, mode, num_iterations=40)
    row_by_row = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 1), patches, upstream)
    whole = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 10**9), patches, upstream)
    for ours, reference in zip(row_by_row, whole, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_fused_scores_without_gradient_match_and_patch_on_its_centre(adfa_like: AdfaLike) -> None:
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


def test_fused_scores_refuse_trainable_centres(adfa_like: AdfaLike) -> None:
    patches, centers, _ = adfa_like(1, 9, 4, torch.float64, seed=4)
    with pytest.raises(ValueError, match="centre bank as constant"):
        nearest_center_scores(patches, centers.requires_grad_(), "kl_weighted", TopKSettings())


def test_distance_modes() -> None:
    patches, centers = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    expected = torch.cdist(patches, centers.expand(2, -1, -1)).square()
    torch.testing.assert_close(dense_distances(patches, centers, "squared"), expected)
    torch.testing.assert_close(dense_distances(patches, centers, "euclidean"), expected.sqrt(), atol=1e-6, rtol=0)
    kl = F.kl_div(patches.log_softmax(-1), centers.softmax(-1).expand(2, -1, -1), reduction="none").sum(dim=(1, 2))
    torch.testing.assert_close(kl_weight(patches, centers).view(2), kl)
    torch.testing.assert_close(dense_distances(patches, centers, "kl_weighted"), expected * kl.view(2, 1, 1))
    with pytest.raises(ValueError, match="distance must be one of"):
        dense_distances(patches, centers, "cosine")  # type: ignore[arg-type]


@pytest.mark.parametrize(("num_centers", "count"), [(3136, 3), (3136, 8), (784, 4), (97, 4), (12, 12)])
def test_smallest_distances_equal_topk(num_centers: int, count: int) -> None:
    distances = torch.randn(21, num_centers, generator=torch.Generator().manual_seed(num_centers)).square()
    distances[0, 5] = -1e-7  # a rounding negative is returned clamped
    values, indices = smallest_distances(distances, count)
    expected = torch.topk(distances, count, dim=-1, largest=False)
    torch.testing.assert_close(values, expected.values.clamp_min(0.0), rtol=0, atol=0)
    torch.testing.assert_close(distances.gather(1, indices).clamp_min(0.0), values, rtol=0, atol=0)
    assert (selection_block(num_centers, count) > 1) == (num_centers in (3136, 784))  # 97 is prime: plain topk


def test_only_rows_outside_the_tolerance_are_evaluated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(5)
    distances = torch.rand(40, 200, generator=generator, dtype=torch.float64) * 3.0
    slope, shift = torch.full((40, 1), 2.0, dtype=torch.float64), torch.zeros(40, 1, dtype=torch.float64)
    exact = solve_threshold(-slope * distances, 3, num_iterations=100)  # weights sigmoid(beta - slope * d)
    start = exact.clone()
    start[[3, 17]] += 0.5  # two rows start off their root
    logit_ratio = math.log(3 / 197)
    lower = logit_ratio + slope * distances.amin(-1, keepdim=True)
    upper = logit_ratio + slope * distances.amax(-1, keepdim=True)
    rows_evaluated = []
    kernel = kernels.weight_sums

    def recording(chunk: torch.Tensor, *args: torch.Tensor, eager: bool) -> torch.Tensor:
        rows_evaluated.append(chunk.shape[0])
        return kernel(chunk, *args, eager=eager)

    monkeypatch.setattr(kernels, "weight_sums", recording)
    row_search = search.RowSearch(slope, shift, start, lower, upper)
    tol = default_tolerance(torch.float64)
    topk = TopKSettings(3, "reference", num_iterations=40)
    sums = search.search_chunk(distances, row_search, topk, tol, None, 0.0)
    assert rows_evaluated[0] == 40
    assert len(rows_evaluated) > 1
    assert all(rows == 2 for rows in rows_evaluated[1:])
    assert (sums[:, 0] - 3).abs().max() <= tol * 3
    # With a gradient the first evaluation writes it for every row; the two rows get theirs at their final threshold.
    rows_evaluated.clear()
    gradient = torch.full_like(distances, math.nan)
    with_gradient = search.search_chunk(distances, row_search, topk, tol, gradient, 0.0)
    assert rows_evaluated
    assert all(rows == 2 for rows in rows_evaluated)
    expected = torch.empty_like(distances)
    expected_sums = kernels.sums_and_gradient.function(distances, exact, slope, shift, 0.0, expected)
    torch.testing.assert_close(with_gradient, expected_sums, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gradient, expected, rtol=1e-8, atol=1e-12)


def along_a_path(batch: int, patches: int, channels: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Centres along a random walk and descriptors near them: a few centres per patch carry sharp-mode weight."""
    generator = torch.Generator().manual_seed(seed)
    centers = 0.3 * torch.randn(patches, channels, generator=generator).cumsum(dim=0)
    noise = torch.randn(batch, patches, channels, generator=generator)
    return (centers + 0.2 * noise).requires_grad_(), centers, torch.randn(batch, patches, generator=generator)


@pytest.mark.parametrize("distance", DISTANCE_MODES)
def test_sharp_mode_on_its_nearest_centres_equals_the_full_rows(distance: str, monkeypatch: pytest.MonkeyPatch) -> None:
    patches, centers, upstream = along_a_path(2, 400, 16, seed=7)
    topk = TopKSettings(3, "sharp")
    exact = TopKSettings(3, "sharp", num_iterations=40)
    plain = values_and_grads(
        plain_scores(patches.double(), centers.double(), distance, exact), patches, upstream.double()
    )
    full_rows = []
    search_chunk = modes.search_chunk

    def recording(chunk: torch.Tensor, *args: object) -> torch.Tensor:
        full_rows.append(chunk.shape[0])
        return search_chunk(chunk, *args)

    monkeypatch.setattr(modes, "search_chunk", recording)
    pruned = values_and_grads(nearest_center_scores(patches, centers, distance, topk), patches, upstream)
    assert sum(full_rows) < 0.1 * patches.shape[0] * patches.shape[1]  # most rows solved on 16 centres
    # With a negative allowance every row is searched on its full distances, from the subset's root.
    full_rows.clear()
    monkeypatch.setattr(modes, "PRUNED_MASS_EPS", -1.0)
    unpruned = values_and_grads(nearest_center_scores(patches, centers, distance, topk), patches, upstream)
    assert sum(full_rows) == patches.shape[0] * patches.shape[1]
    for ours, full, reference in zip(pruned, unpruned, plain, strict=True):
        scale = reference.abs().max().item()
        # Both agree with float64 to the float32 rounding of the distances, and with each other more closely.
        torch.testing.assert_close(ours.double(), reference.double(), rtol=0, atol=5e-4 * scale)
        torch.testing.assert_close(full.double(), reference.double(), rtol=0, atol=5e-4 * scale)
        torch.testing.assert_close(ours, full, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("mode", TOPK_MODES)
def test_one_image_per_sweep_equals_whole_batch(
    mode: str, monkeypatch: pytest.MonkeyPatch, adfa_like: AdfaLike
) -> None:
    patches, centers, upstream = adfa_like(3, 36, 8, torch.float64, seed=6)
    topk = TopKSettings(3, mode, num_iterations=40)
    whole = values_and_grads(nearest_center_scores(patches, centers, "kl_weighted", topk, 100), patches, upstream)
    assert chunking.chunking_for(3, 36, 36, torch.float64, 100, False).images_per_sweep == 3
    monkeypatch.setattr(chunking, "last_level_cache_bytes", lambda: 36 * 36 * 8)  # one image's block
    assert chunking.chunking_for(3, 36, 36, torch.float64, 100, False) == (1, 2)
    single = values_and_grads(nearest_center_scores(patches, centers, "kl_weighted", topk, 100), patches, upstream)
    for ours, reference in zip(single, whole, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_chunk_sizes_follow_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    assert chunking.last_level_cache_bytes() > 0
    monkeypatch.setattr(chunking, "last_level_cache_bytes", lambda: 48 << 20)
    assert chunking.default_chunk_elements(torch.float32) == 2 << 20
    assert chunking.default_chunk_elements(torch.float64) == 1 << 20
    # Exported graphs take any batch: the whole batch in one sweep, chunks sized per image.
    assert chunking.chunking_for(8, 3136, 3136, torch.float32, 1 << 20, True) == (8, 334)


@pytest.mark.parametrize("distance", ["kl_weighted", "euclidean"])
def test_soft_sweeps_reuse_their_memory_and_return_none_of_it(
    distance: str, monkeypatch: pytest.MonkeyPatch, adfa_like: AdfaLike
) -> None:
    monkeypatch.setattr(modes, "sweep_memory", memory.SweepMemory())
    patches, centers, upstream = adfa_like(3, 49, 12, torch.float32, seed=8)
    topk = TopKSettings(3, "reference")
    first = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 500), patches, upstream)
    buffer = modes.sweep_memory.buffer
    # The block of the whole batch (one sweep) and one gradient chunk of 3 images x 3 rows.
    assert chunking.chunking_for(3, 49, 49, torch.float32, 500, False) == (3, 3)
    assert buffer is not None
    assert buffer.numel() == (49 + 3) * 3 * 49
    second = values_and_grads(nearest_center_scores(patches, centers, distance, topk, 500), patches, upstream)
    assert modes.sweep_memory.buffer is buffer  # taken again, not allocated again
    buffer.fill_(math.nan)  # nothing returned lives in it
    for again, before in zip(second, first, strict=True):
        assert again.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        torch.testing.assert_close(again, before, rtol=0, atol=0)
    plain = values_and_grads(plain_scores(patches, centers, distance, topk), patches, upstream)
    for ours, reference in zip(second, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=2e-4, atol=1e-5 * reference.abs().max().item())


def test_selected_directions_are_the_weighted_sums_of_the_selected_centre_operands() -> None:
    generator = torch.Generator().manual_seed(9)
    chain = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    columns = torch.randint(0, 11, (7, 5), generator=generator)
    center_operand = torch.randn(11, 6, generator=generator, dtype=torch.float64)
    expected = torch.stack([(chain[row, :, None] * center_operand[columns[row]]).sum(0) for row in range(7)])
    directions = selected_directions(chain, columns, center_operand)
    torch.testing.assert_close(directions, expected, rtol=1e-14, atol=1e-14)
