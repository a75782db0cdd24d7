"""The per-chunk passes: their formulas, compiled against plain, and the fallback without a compiler."""

import logging
import math
from collections.abc import Callable

import pytest
import torch

from anomalib_adfa.scoring import kernels, modes, search
from anomalib_adfa.scoring.kernels import ChunkKernel

ChunkInputs = Callable[..., tuple[torch.Tensor, ...]]


def test_weight_terms_are_the_clamped_sigmoid_and_its_slope(chunk_inputs: ChunkInputs) -> None:
    distances, beta, slope, shift = chunk_inputs(6, 50, torch.float64, seed=0)
    clamped, weights, slopes = kernels.weight_terms(distances, beta, slope, shift)
    expected = torch.sigmoid(beta - slope * (distances.clamp_min(0.0) - shift))
    torch.testing.assert_close(clamped, distances.clamp_min(0.0), rtol=0, atol=0)
    torch.testing.assert_close(weights, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(slopes, expected * (1 - expected), rtol=1e-11, atol=0)
    # Far below the floor log(sqrt(tiny)) the weight stays at sqrt(tiny) instead of underflowing.
    far = kernels.weight_terms(torch.full((1, 2), 1e6), torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1))
    assert torch.allclose(far[1], torch.tensor(math.sqrt(torch.finfo(torch.float32).tiny)), rtol=1e-3)


def test_row_sums_and_gradient_formulas(chunk_inputs: ChunkInputs) -> None:
    distances, beta, slope, shift = chunk_inputs(5, 40, torch.float64, seed=1)
    clamped, weights, slopes = kernels.weight_terms(distances, beta, slope, shift)
    sums = kernels.weight_sums.function(distances, beta, slope, shift)
    expected = torch.stack(
        [weights.sum(-1), slopes.sum(-1), (weights * clamped).sum(-1), (slopes * clamped).sum(-1)], dim=-1
    )
    torch.testing.assert_close(sums, expected)
    mean = sums[:, 3:] / sums[:, 1:2]
    gradient = torch.full_like(distances, math.nan)
    same_sums = kernels.sums_and_gradient.function(distances, beta, slope, shift, 0.0, gradient)
    torch.testing.assert_close(same_sums, sums, rtol=0, atol=0)
    expected_gradient = (weights - slope * slopes * (clamped - mean)) * (distances > 0)
    torch.testing.assert_close(gradient, expected_gradient)
    extremes = kernels.row_extremes.function(distances, shift)
    centred = clamped - shift
    torch.testing.assert_close(extremes[:, 0], clamped.amin(-1))
    torch.testing.assert_close(extremes[:, 1], clamped.amax(-1))
    powers = torch.stack([centred.pow(j).sum(-1) for j in range(1, 5)], -1)
    torch.testing.assert_close(extremes[:, 2:], powers)
    minima = kernels.group_minima.function(distances, 8)
    torch.testing.assert_close(minima, torch.stack([distances[:, g::5].amin(-1) for g in range(5)], -1))
    # "euclidean": distances are sqrt(q + eps) and the chain rule halves and divides by them.
    roots = distances.clamp_min(0.0).add(1e-12).sqrt()
    clamped, weights, slopes = kernels.weight_terms(roots, beta, slope, shift)
    sums = kernels.sums_and_gradient.function(roots, beta, slope, shift, 1e-6, gradient)
    mean = sums[:, 3:] / sums[:, 1:2]
    expected_gradient = 0.5 * (weights - slope * slopes * (roots - mean)) / roots * (roots > 1e-6)
    torch.testing.assert_close(gradient, expected_gradient)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_kernels_agree_with_plain(
    chunk_inputs: ChunkInputs, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ChunkKernel, "min_elements", 0)  # compile even this small chunk
    distances, beta, slope, shift = chunk_inputs(37, 300, dtype, seed=2)
    kernels.weight_sums(distances, beta, slope, shift, eager=True)
    if ChunkKernel.compiler_failed:
        pytest.skip("torch.compile cannot build kernels here (no working C++ compiler); the plain path is tested")
    assert kernels.weight_sums._compiled is not None
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    sum_scale = distances.shape[-1] * distances.abs().max().item()  # the centred sums cancel to near 0
    cases = [
        (kernels.weight_sums, (distances, beta, slope, shift), rtol),
        (kernels.row_extremes, (distances, shift), rtol * sum_scale),
        (kernels.group_minima, (distances, 30), 0.0),
        # The gradient is written into the last argument: compared with the returned sums.
        (kernels.sums_and_gradient, (distances, beta, slope, shift, 0.0, torch.empty_like(distances)), rtol),
        (
            kernels.sums_and_gradient,
            (distances.abs().add(1e-3).sqrt(), beta, slope, shift, 1e-6, torch.empty_like(distances)),
            rtol,
        ),
    ]
    for kernel, args, atol in cases:
        compiled_args = [arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args]
        plain_args = [arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args]
        compiled, plain = kernel(*compiled_args, eager=True), kernel.function(*plain_args)
        torch.testing.assert_close(compiled, plain, rtol=rtol, atol=atol)
        torch.testing.assert_close(compiled_args[-1], plain_args[-1], rtol=rtol, atol=atol)


def test_compile_failure_falls_back_to_plain_with_one_warning(
    chunk_inputs: ChunkInputs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compile(function: object, **_: object) -> object:
        def raise_failure(*_args: object) -> None:
            msg = "InvalidCxxCompiler: No working C++ compiler found"
            raise torch._dynamo.exc.TorchDynamoException(msg)

        return raise_failure

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(ChunkKernel, "compiler_failed", False)
    monkeypatch.setattr(ChunkKernel, "min_elements", 0)
    kernel = ChunkKernel(kernels.weight_sums.function)
    other = ChunkKernel(kernels.row_extremes.function)
    distances, beta, slope, shift = chunk_inputs(4, 20, torch.float32, seed=3)
    with caplog.at_level(logging.WARNING, logger="anomalib_adfa.scoring.kernels"):
        result = kernel(distances, beta, slope, shift, eager=True)
        other(distances, shift, eager=True)  # every kernel now runs plain, without compiling or warning again
    assert ChunkKernel.compiler_failed
    torch.testing.assert_close(result, kernel.function(distances, beta, slope, shift), rtol=0, atol=0)
    assert other._compiled is None
    warnings = [record for record in caplog.records if "could not build" in record.getMessage()]
    assert len(warnings) == 1
    assert "No working C++ compiler" in warnings[0].getMessage()


def test_small_chunks_and_traced_graphs_run_plain(chunk_inputs: ChunkInputs, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compile(*_: object, **__: object) -> None:
        pytest.fail("a small chunk or a traced call must not compile")

    monkeypatch.setattr(torch, "compile", no_compile)
    kernel = ChunkKernel(kernels.row_extremes.function)
    distances, _, _, shift = chunk_inputs(4, 20, torch.float32, seed=4)
    torch.testing.assert_close(kernel(distances, shift, eager=True), kernel.function(distances, shift))
    monkeypatch.setattr(ChunkKernel, "min_elements", 0)
    traced = torch.jit.trace(lambda d, c: kernel(d, c, eager=False), (distances, shift), check_trace=False)
    torch.testing.assert_close(traced(distances, shift), kernel.function(distances, shift))


def test_the_searches_row_kernels_compile_into_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    # A data-dependent exit inside a compiled kernel would fail fullgraph compilation and send every kernel of the
    # process to plain PyTorch: the per-row kernels of the sharp and reference searches must compile whole.
    monkeypatch.setattr(ChunkKernel, "min_elements", 0)
    generator = torch.Generator().manual_seed(10)
    nearest = (torch.rand(64, 16, generator=generator) * 4.0).sort(dim=-1).values
    for kernel in (modes.sharp_subset, search.reference_search):
        monkeypatch.setattr(kernel, "own_min_elements", 0)
    kernels.weight_sums(nearest, torch.zeros(64, 1), torch.ones(64, 1), torch.zeros(64, 1), eager=True)
    if ChunkKernel.compiler_failed:
        pytest.skip("torch.compile cannot build kernels here (no working C++ compiler); the plain path is tested")
    subset = modes.sharp_subset(nearest, 3, 0.1, 3136, 1e-5, 0.0, eager=True)
    statistics = torch.cat([nearest[:, :2], nearest[:, 2:6]], dim=-1).view(2, 32, 6)
    row_search = search.reference_search(statistics, nearest[:, 0].view(2, 32), 3, 0.1, 3136, eager=True)
    assert not ChunkKernel.compiler_failed
    assert modes.sharp_subset._compiled is not None
    assert search.reference_search._compiled is not None
    torch.testing.assert_close(
        subset[0], modes.sharp_subset.function(nearest, 3, 0.1, 3136, 1e-5, 0.0)[0], rtol=1e-5, atol=1e-5
    )
    expected = search.reference_search.function(statistics, nearest[:, 0].view(2, 32), 3, 0.1, 3136)
    torch.testing.assert_close(row_search.start, expected.start)
