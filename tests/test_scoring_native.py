"""The C++ row operators: accuracy against float64, agreement with PyTorch's kernels, the build and its fallbacks."""

import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anomalib_adfa.scoring import PatchScorer, kernels, native
from anomalib_adfa.scoring.soft_topk import argument_floor

ChunkInputs = Callable[..., tuple[torch.Tensor, ...]]


@pytest.fixture
def native_built() -> None:
    if native.library() is None:
        pytest.skip("no C++ compiler with OpenMP (or no ninja) here: the C++ kernels are not built; PyTorch's run")


@pytest.mark.usefixtures("native_built")
def test_single_weights_are_the_sigmoid_within_float32_rounding() -> None:
    # With one column the sums are the weight z, its slope s = z (1 - z), z d and s d themselves: a check of the
    # C exponential and reciprocal over the arguments the kernels see, from the floor to saturated weights.
    floor = argument_floor(torch.float32)
    arguments = torch.linspace(floor + 1e-3, 40.0, 200_001, dtype=torch.float64).float()
    distances = torch.full((arguments.numel(), 1), 2.0)
    beta = arguments.unsqueeze(-1)
    ones = torch.ones_like(beta)
    sums = native.row_sums(distances, beta, ones, 2.0 * ones).double()
    exact = beta.double()
    weights = torch.sigmoid(exact)
    slopes = torch.exp(-exact) * weights.square()
    # Both kernels round a log2(e) before the exponential: a relative error of about |a| 2^-24 on exp(-a) (the
    # docstring of soft_topk.logistic_weights), on top of a few roundings.
    bound = 3e-7 + 7e-8 * exact.abs()
    for value, expected in ((sums[:, :1], weights), (sums[:, 1:2], slopes), (sums[:, 2:3], 2.0 * weights)):
        assert ((value - expected).abs() <= bound * expected).all()
    # Below the floor the weight stays at sigmoid(floor), as in the PyTorch kernels (the C++ file has its own constant).
    below = torch.tensor([[floor - 1.0], [-1e4]])
    far = native.row_sums(distances[:2], below, ones[:2], 2.0 * ones[:2])
    torch.testing.assert_close(
        far[:, 0], torch.sigmoid(torch.tensor(floor)).expand(2), rtol=3e-7 + 7e-8 * abs(floor), atol=0
    )


@pytest.mark.usefixtures("native_built")
@pytest.mark.parametrize("zero", [0.0, 1e-6])
def test_sums_gradient_and_extremes_are_as_accurate_as_pytorchs(chunk_inputs: ChunkInputs, zero: float) -> None:
    distances, beta, slope, shift = chunk_inputs(53, 3136, torch.float32, seed=5)
    slope[:10] *= 40.0  # sharp rows: weights saturated at 0 and 1 and arguments at the floor
    if zero > 0.0:
        distances = distances.abs().add(1e-3).sqrt()
    wide = [tensor.double() for tensor in (distances, beta, slope, shift)]
    exact_gradient = torch.empty_like(wide[0])
    exact = kernels.sums_and_gradient.function(*wide, zero, exact_gradient)
    results = {}
    for name, kernel in (("C", native.row_sums), ("PyTorch", kernels.sums_and_gradient.function)):
        gradient = torch.full_like(distances, math.nan)
        sums = kernel(distances, beta, slope, shift, zero, gradient)
        results[name] = (sums, ((sums - exact) / exact).abs().max(), (gradient - exact_gradient).abs().max())
    sums, sums_error, gradient_error = results["C"]
    # In float32 the sharp rows' gradients are exact to about 1e-5 only (b s (d - mean) with b = 200 amplifies
    # the rounding of the mean): the C kernel is held to PyTorch's float32 accuracy, not to a fixed figure.
    assert sums_error <= 2.0 * results["PyTorch"][1] + 1e-7
    assert gradient_error <= 3.0 * results["PyTorch"][2] + 1e-7
    torch.testing.assert_close(kernels.weight_sums(distances, beta, slope, shift, eager=True), sums, rtol=0, atol=0)
    extremes = kernels.row_extremes(distances, shift, eager=True)
    exact_extremes = kernels.row_extremes.function(wide[0], wide[3])
    torch.testing.assert_close(extremes[:, :2].double(), exact_extremes[:, :2], rtol=0, atol=0)
    # The centred moments cancel to near 0: their rounding is bounded by N eps max|d|^k, not relative to them.
    bound = 1e-6 * distances.shape[-1] * distances.abs().amax().double() ** torch.arange(1, 5, dtype=torch.float64)
    assert ((extremes[:, 2:].double() - exact_extremes[:, 2:]).abs() <= bound).all()


@pytest.mark.usefixtures("native_built")
def test_nan_distances_give_nan_sums_and_gradients(chunk_inputs: ChunkInputs) -> None:
    distances, beta, slope, shift = chunk_inputs(4, 64, torch.float32, seed=6)
    distances[1, 7] = math.nan
    gradient = torch.empty_like(distances)
    sums = kernels.sums_and_gradient(distances, beta, slope, shift, 0.0, gradient, eager=True)
    assert sums[1].isnan().all()
    assert not sums[[0, 2, 3]].isnan().any()
    assert gradient[1].isnan().any()
    assert kernels.row_extremes(distances, shift, eager=True)[1, 2:].isnan().all()


def test_other_tensors_are_left_to_pytorch(chunk_inputs: ChunkInputs) -> None:
    distances, beta, slope, shift = chunk_inputs(3, 10, torch.float64, seed=7)
    assert native.row_sums(distances, beta, slope, shift) is None
    assert native.row_extremes(distances, shift) is None
    single = [tensor.float() for tensor in (distances, beta, slope, shift)]
    assert native.row_sums(single[0].unsqueeze(0), *single[1:]) is None
    assert native.row_extremes(single[0][:, :0], single[3]) is None


@pytest.mark.usefixtures("native_built")
def test_traced_scoring_holds_no_native_operator() -> None:
    # Traced (exported) graphs hold ordinary operators only: the fused backend decides so at its entry.
    generator = torch.Generator().manual_seed(9)
    centers = torch.randn(64, 8, generator=generator)
    patches = centers + 0.5 * torch.randn(2, 64, 8, generator=generator)
    scorer = PatchScorer(3, "reference", backend="fused")
    traced = torch.jit.trace(scorer, (patches, centers), check_trace=False)
    assert "anomalib_adfa::" not in str(traced.graph)  # no call of torch.ops.anomalib_adfa
    with torch.no_grad():
        torch.testing.assert_close(traced(patches, centers), scorer(patches, centers), rtol=1e-5, atol=1e-4)


def test_a_failed_build_leaves_pytorchs_kernels_in_charge(
    chunk_inputs: ChunkInputs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built yet: the build must run
    monkeypatch.setattr(native, "registered", lambda: False)  # as in a process that has not loaded them
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="anomalib_adfa.scoring.native"):
            assert native.library() is None
            distances, beta, slope, shift = chunk_inputs(5, 40, torch.float32, seed=8)
            result = kernels.weight_sums(distances, beta, slope, shift, eager=True)
        torch.testing.assert_close(result, kernels.weight_sums.function(distances, beta, slope, shift))
        warnings = [record.getMessage() for record in caplog.records if "Could not build" in record.getMessage()]
        assert len(warnings) == 1
        assert "no-such-compiler-here" in warnings[0]
        monkeypatch.delenv("CXX")
        monkeypatch.setenv(native.ENVIRONMENT_SWITCH, "0")
        native.library.cache_clear()
        assert native.library() is None  # switched off: not even tried
        assert not list(tmp_path.rglob("*.so"))  # the bogus compiler built nothing
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@pytest.mark.usefixtures("native_built")
def test_the_operators_are_loaded_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # A second build and load would register the operators' namespace again, which PyTorch refuses.
    def no_build() -> None:
        pytest.fail("the operators are already loaded: they must not be built or loaded again")

    native.library.cache_clear()
    monkeypatch.setattr(native, "_build", no_build)
    try:
        assert native.library() is not None
    finally:
        native.library.cache_clear()
