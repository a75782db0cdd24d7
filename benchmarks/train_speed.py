"""Training-step speed of ADFA against the public soft top-k and against the unavoidable work.

Measured side by side in one process, on the same cached features, at two sets of dimensions: the
paper's (WR50 layer1-3 shapes at 224 px: 56x56 = 3136 patches and centres, D = 1792, D' = 448) and
EfficientNet-Lite0's at 224 px (D' = 44, the project's CPU backbone); K = 3, batch 10. The backbones
have random weights, which changes the values but not the work:

(a) our training step, features read from the :class:`~anomalib_adfa.feature_cache.FeatureCache`
    (half precision), descriptor, fused scores, loss, backward and AdamW step, in every mode;
(b) the public algorithm: 200 Sinkhorn scalings of the ``(B*T, N, 2)`` plan with the public cost
    ``C = (d - a)^2 / max C`` (batch-wide max), forward and implicit backward, written here from the
    paper. It is timed on a slice of patch rows (the rows are independent problems, so the time is
    linear in them) and scaled to the batch, then added to the floor below;
(c) the floor: the 1x1 descriptor convolution of the concatenated features and the patch-to-centre
    distances at their minimal cost (one matmul per chunk forward and its sum, one matmul backward),
    nothing else. Two more floors are printed for context: with our per-layer projection (stricter) and
    with the naive autograd distances (full-size intermediates; looser).

Every step variant is timed ``--repeats`` times, round-robin (one run of each variant in turn, so that
a slow spell of a shared machine hits all of them alike), after one warm-up each; the figures are
medians with their range, and each ratio is the median of the per-round ratios. The script also counts
the passes each mode makes over each chunk of the patch-by-centre block and times one pass of each kind
against a plain ``torch.exp`` over the same block; checks that (a) in reference mode gives the loss of
(b) on the same rows of one image; measures the peak resident memory of a BrainMRI-sized training run
(58 images, in a child process) and the eval-mode latency per image.

The last lines say whether the targets are met (ours / floor <= 1.5 in reference and hard mode, <= 2.0
in sharp mode, for both sets of dimensions) and read
``ratio_reference_over_ours=<x> ratio_ours_over_floor=<y> s_per_epoch_brainmri=<z>`` (WR50 dimensions).

Usage::

    .venv/bin/python -m benchmarks.train_speed
    .venv/bin/python -m benchmarks.train_speed --repeats 3 --sinkhorn-rows 32 --dims Lite0   # short run
"""

from __future__ import annotations

import argparse
import datetime
import math
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from anomalib_adfa.backbones import LITE0_LAYERS
from anomalib_adfa.feature_cache import FeatureCache
from anomalib_adfa.scoring import TOPK_MODES, PatchScorer, TopKSettings, chunking, modes, selection
from anomalib_adfa.scoring import kernels as chunk_kernels
from anomalib_adfa.scoring.chunking import default_chunk_elements
from anomalib_adfa.scoring.distances import dense_distances, distance_operands, operand_distances
from anomalib_adfa.scoring.plain import topk_weights
from anomalib_adfa.torch_model import AdfaModel
from anomalib_adfa.weights import LITE0_BACKBONE
from benchmarks.machine import commit, cpu_model

WR50 = ("wide_resnet50_2", ("layer1", "layer2", "layer3"))
LITE0 = (LITE0_BACKBONE, LITE0_LAYERS)
BRAINMRI_TRAIN_IMAGES = 58
SINKHORN_ITERATIONS = 200
EPSILON = 0.1
FLOORS = ("floor", "floor_decomposed", "floor_naive")


TARGETS = {"reference": 1.5, "hard": 1.5, "sharp": 2.0}


def timed(step: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``step`` over ``repeats`` runs after a warm-up."""
    return statistics.median(round_robin({"step": step}, repeats)["step"])


def round_robin(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of every step, ``repeats`` rounds of one run each in turn, after one warm-up run each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def spread(values: list[float]) -> str:
    """``median [min, max]`` of a list of timings or ratios."""
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def relative(times: dict[str, list[float]], name: str, other: str) -> float:
    """Median over rounds of ``times[name] / times[other]``."""
    return statistics.median(a / b for a, b in zip(times[name], times[other], strict=True))


def build_model(arch: tuple[str, tuple[str, ...]], mode: str = "reference") -> AdfaModel:
    backbone, layers = arch
    return AdfaModel(backbone=backbone, layers=layers, pre_trained=False, topk_mode=mode).eval()


def cached_batch(model: AdfaModel, images: torch.Tensor) -> tuple[FeatureCache, list[str]]:
    """Fill a half-precision feature cache with the images' backbone features, as training does."""
    cache = FeatureCache()
    cache.bind("train-speed")
    keys = [f"image-{index}" for index in range(images.shape[0])]
    cache.put(keys, model.extract_features(images))
    return cache, keys


def our_step(model: AdfaModel, cache: FeatureCache) -> Callable[[list[str]], float]:
    """Training step on the cached features of the images ``keys``: the work of ``Adfa.training_step``."""
    optimizer = torch.optim.AdamW(model.descriptor.parameters(), lr=1e-3, weight_decay=5e-4, amsgrad=True)

    def step(keys: list[str]) -> float:
        features = cache.get(keys, torch.device("cpu"), torch.float32)
        loss = model.patch_scores(model.describe(features)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


class _MatmulDistances(torch.autograd.Function):
    """Patch-to-centre distances at their minimal cost: one matmul per chunk forward, one backward.

    Forward computes (and drops) every chunk of the ``(B, T, N)`` distance matrix, summing it; backward pushes
    a dense ``(B, t, N)`` gradient of ones through each chunk. No clamp, no selection, no weighting: the work
    any exact ADFA step must do on the distances. Chunks have the fused kernel's size.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        patch_operand, center_operand = distance_operands(patches, centers)
        rows = max(1, default_chunk_elements(patches.dtype) // (patches.shape[0] * centers.shape[0]))
        total = patches.new_zeros(())
        for start in range(0, patches.shape[1], rows):
            total += operand_distances(patch_operand[:, start : start + rows], center_operand, False).sum()
        ctx.save_for_backward(patches)
        ctx.center_operand, ctx.rows = center_operand, rows
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (patches,) = ctx.saved_tensors
        channels, rows = patches.shape[-1], ctx.rows
        grad_patches = torch.empty_like(patches)
        for start in range(0, patches.shape[1], rows):
            chunk = patches[:, start : start + rows]
            dense = grad.expand(*chunk.shape[:2], ctx.center_operand.shape[0])
            projected = dense.contiguous() @ ctx.center_operand
            grad_patches[:, start : start + rows] = projected[..., :channels] + 2 * chunk * projected[..., channels:-1]
        return grad_patches, None


def floor_step(model: AdfaModel, features: list[torch.Tensor], variant: str) -> Callable[[], None]:
    """Descriptor and distances, forward and backward, nothing else.

    Variants: ``"floor"``: the 1x1 conv of the concatenated features (the issue's descriptor floor) and
    :class:`_MatmulDistances`; ``"floor_decomposed"``: the same with our per-layer projection at native
    resolution (the strictest floor); ``"floor_naive"``: concatenated conv and the plain autograd
    distances of :func:`~anomalib_adfa.scoring.distances.dense_distances` (full-size intermediate tensors, as a
    naive implementation).
    """
    describe = model.describe if variant == "floor_decomposed" else model.descriptor

    def step() -> None:
        patches = describe(features).flatten(2).transpose(1, 2)
        total = (
            dense_distances(patches, model.centers, "kl_weighted").sum()
            if variant == "floor_naive"
            else _MatmulDistances.apply(patches, model.centers)
        )
        total.backward()

    return step


def public_cost(distances: torch.Tensor) -> torch.Tensor:
    """The public code's OT cost ``(d - a)^2`` for anchors 0 and 1, normalised by its batch-wide maximum."""
    cost = torch.stack([distances.square(), (distances - 1.0).square()], dim=-1)
    return cost / cost.max()


def sinkhorn_topk(cost: torch.Tensor, k: int) -> torch.Tensor:
    """Selection weights ``n * Gamma[..., 0]`` after 200 Sinkhorn scalings, with the implicit backward.

    Args:
        cost: ``(R, n, 2)``: one two-anchor problem per patch row.
        k: Mass ``k / n`` goes to anchor 0.

    Returns:
        ``(R, n)`` weights.
    """
    return _SinkhornTopK.apply(cost, k)


class _SinkhornTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, cost: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        n = cost.shape[1]
        kernel = torch.exp(-cost / EPSILON)
        mu = 1.0 / n
        nu = cost.new_tensor([k / n, (n - k) / n])
        v = torch.full_like(cost[:, :1, :], 0.5)
        for _ in range(SINKHORN_ITERATIONS):
            u = mu / (kernel * v).sum(dim=-1, keepdim=True)
            v = nu / (kernel * u).sum(dim=-2, keepdim=True)
        plan = u * kernel * v
        ctx.save_for_backward(plan)
        return n * plan[..., 0]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # Implicit differentiation of the two-anchor plan: with z = n * Gamma[:, 0] and s = z (1 - z),
        # dz_i / dC_j0 = -(s_i d_ij - s_i s_j / sum s) / eps and dC_j1 acts with the opposite sign.
        (plan,) = ctx.saved_tensors
        n = plan.shape[1]
        weights = n * plan[..., 0]
        slope = weights * (1.0 - weights)
        mean = (grad * slope).sum(dim=-1, keepdim=True) / slope.sum(dim=-1, keepdim=True)
        grad_logits = slope * (grad - mean) / EPSILON
        return torch.stack([-grad_logits, grad_logits], dim=-1), None


def reference_step(distances: torch.Tensor, k: int) -> Callable[[], float]:
    """Public soft top-k on the given distance rows, forward and backward; returns the mean patch score."""
    distances = distances.detach().requires_grad_()

    def step() -> float:
        weights = sinkhorn_topk(public_cost(distances), k)
        loss = (weights * distances).sum(dim=-1).mean()
        loss.backward()
        return loss.item()

    return step


def load_images(count: int, size: int = 224) -> torch.Tensor:
    """BrainMRI normal images resized to 256 and centre-cropped, or random images if the data is absent."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_tumor_dataset" / "no"
    files = sorted(folder.glob("*"))[:count] if folder.is_dir() else []
    if len(files) < count:
        return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    from PIL import Image
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.Resize((256, 256), antialias=True),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    return torch.stack([transform(Image.open(file).convert("RGB")) for file in files])


def speed(arch: tuple[str, tuple[str, ...]], batch: int, repeats: int, sinkhorn_rows: int) -> dict[str, object]:
    """Timings of (a) each mode, (b) the public algorithm, (c) the floors; pass counts and per-pass times."""
    torch.manual_seed(0)
    model = build_model(arch)
    images = load_images(batch)
    with torch.no_grad():
        cache, keys = cached_batch(model, images)
        features = cache.get(keys, torch.device("cpu"), torch.float32)
        model.set_centers(model.describe(features).mean(dim=0).flatten(1).T)
    model.train()
    steps: dict[str, Callable[[], object]] = {}
    scorers = {mode: PatchScorer(3, mode) for mode in TOPK_MODES}
    for mode in TOPK_MODES:
        step = our_step(model, cache)

        def run(mode: str = mode, step: Callable[[list[str]], float] = step) -> float:
            model.scorer = scorers[mode]
            return step(keys)

        steps[mode] = run
    for variant in FLOORS:
        steps[variant] = floor_step(model, features, variant)
    times = round_robin(steps, repeats)
    results: dict[str, object] = {"times": times}
    results["ratios"] = {
        name: [ours / floor for ours, floor in zip(times[name], times["floor"], strict=True)] for name in times
    }
    results["passes"] = {mode: count_passes(model, cache, keys, scorers[mode]) for mode in TOPK_MODES}
    model.scorer = scorers["reference"]
    results["pass_times"] = pass_times(model, features, repeats)

    # (b) on `sinkhorn_rows` patch rows of the first image, scaled to the batch's B*T rows.
    with torch.no_grad():
        patches = model.describe([feature[:1] for feature in features]).flatten(2).transpose(1, 2)
        distances = dense_distances(patches, model.centers, "kl_weighted")[0]
    rows = distances[:sinkhorn_rows]
    num_rows = batch * distances.shape[0]
    results["sinkhorn"] = timed(reference_step(rows, 3), 1) * num_rows / rows.shape[0]
    results["reference_algorithm"] = statistics.median(times["floor"]) + results["sinkhorn"]

    # Loss check on the same rows, with the public normaliser taken over the whole image (as for a batch of 1).
    cost_scale = torch.maximum(distances.square(), (distances - 1.0).square()).max()
    cost = torch.stack([rows.square(), (rows - 1.0).square()], dim=-1) / cost_scale
    with torch.no_grad():
        public_loss = (sinkhorn_topk(cost, 3) * rows).sum(dim=-1).mean().item()
        ours = topk_weights(distances[None], TopKSettings(3, "reference"))[0, : rows.shape[0]]
        our_loss = (ours * rows).sum(dim=-1).mean().item()
        fused = model.patch_scores(patches.transpose(1, 2).unflatten(2, model_grid(model)))[0, : rows.shape[0]]
    results["loss_public"] = public_loss
    results["loss_ours"] = fused.mean().item()
    results["loss_ours_plain"] = our_loss
    results["loss_rel_diff"] = abs(results["loss_ours"] - public_loss) / abs(public_loss)
    return results


def count_passes(model: AdfaModel, cache: FeatureCache, keys: list[str], scorer: PatchScorer) -> dict[str, float]:
    """Full passes over the patch-by-centre block in one training step, by kind, forward and backward.

    Every pass of :mod:`anomalib_adfa.scoring.kernels` and every distance matmul is recorded with the number of
    elements it traverses (a search evaluation of a few rows left outside the tolerance counts for their share);
    the sums are divided by the block's ``B * T * N`` elements. The matmul of the gradient pass runs in the
    forward (see :mod:`anomalib_adfa.scoring.modes`), so the backward makes no pass over the block. Sharp mode's
    work on the 16 nearest centres of each patch (``modes.sharp_candidate_scores``) is not a pass over the block.
    """
    counts: Counter[str] = Counter()
    kernel_call = chunk_kernels.ChunkKernel.__call__
    distances_of = modes.operand_distances

    def counted_kernel(kernel: chunk_kernels.ChunkKernel, *args: torch.Tensor, eager: bool) -> object:
        if kernel.function.__module__ == chunk_kernels.__name__:  # not the per-row kernels of the searches' starts
            name = kernel.function.__name__.strip("_")
            counts[name] += args[0].numel()
            if name == "sums_and_gradient":
                counts["gradient matmul"] += args[0].numel()
        return kernel_call(kernel, *args, eager=eager)

    def counted_distances(*args: torch.Tensor, **kwargs: bool) -> torch.Tensor:
        distances = distances_of(*args, **kwargs)
        counts["distance matmul"] += distances.numel()
        return distances

    model.scorer = scorer
    features = cache.get(keys, torch.device("cpu"), torch.float32)
    chunk_kernels.ChunkKernel.__call__ = counted_kernel
    modes.operand_distances = counted_distances
    try:
        scores = model.patch_scores(model.describe(features))
        forward = Counter(counts)
        counts.clear()
        scores.mean().backward()
        backward = Counter(counts)
    finally:
        chunk_kernels.ChunkKernel.__call__ = kernel_call
        modes.operand_distances = distances_of
    model.zero_grad(set_to_none=True)
    block = scores.numel() * model.centers.shape[0]
    passes = {f"forward {name}": value / block for name, value in sorted(forward.items())}
    passes.update({f"backward {name}": value / block for name, value in sorted(backward.items())})
    passes["forward total"] = sum(forward.values()) / block
    passes["backward total"] = sum(backward.values()) / block
    return passes


def pass_times(model: AdfaModel, features: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Seconds of one pass of each kind over the batch's whole block, chunk by chunk, and of ``torch.exp``.

    The block is the reference mode's distance block of the batch, cut into the kernel's chunks; each pass runs
    on every chunk with per-row inputs of the right shapes (the values of the threshold do not change the work).
    """
    with torch.no_grad():
        patches = model.describe(features).flatten(2).transpose(1, 2)
        patch_operand, center_operand = distance_operands(patches, model.centers)
        batch, num_patches, width = patch_operand.shape
        rows = chunking.chunking_for(
            batch, num_patches, model.centers.shape[0], patches.dtype, default_chunk_elements(patches.dtype), False
        ).rows_per_chunk
        chunks = [
            operand_distances(patch_operand[image : image + 1, a : a + rows].reshape(-1, width), center_operand, False)
            for image in range(batch)
            for a in range(0, num_patches, rows)
        ]
    columns = [chunk.mean(dim=-1, keepdim=True) for chunk in chunks]
    slopes = [torch.full_like(column, 1.0 / column.abs().mean().clamp_min(1e-12).item()) for column in columns]
    betas = [
        torch.full_like(column, math.log(3 / chunk.shape[-1])) for column, chunk in zip(columns, chunks, strict=True)
    ]
    gradients = [torch.empty_like(chunk) for chunk in chunks]
    for *args, gradient in zip(chunks, betas, slopes, columns, gradients, strict=True):
        chunk_kernels.sums_and_gradient(*args, 0.0, gradient, eager=True)  # real values for the gradient matmul
    group = selection.selection_block(chunks[0].shape[-1], 4)
    # exp of the distances themselves would overflow; the weights' arguments are of order 1 to 10.
    arguments = [
        (chunk - column) / column.abs().clamp_min(1e-12) for chunk, column in zip(chunks, columns, strict=True)
    ]
    kinds: dict[str, Callable[[], object]] = {
        "torch.exp": lambda: [torch.exp(argument) for argument in arguments],
        "row_extremes": lambda: [
            chunk_kernels.row_extremes(c, m, eager=True) for c, m in zip(chunks, columns, strict=True)
        ],
        "group_minima": lambda: [chunk_kernels.group_minima(chunk, group, eager=True) for chunk in chunks],
        "weight_sums": lambda: [
            chunk_kernels.weight_sums(*args, eager=True) for args in zip(chunks, betas, slopes, columns, strict=True)
        ],
        "sums_and_gradient": lambda: [
            chunk_kernels.sums_and_gradient(*args, 0.0, torch.empty_like(args[0]), eager=True)
            for args in zip(chunks, betas, slopes, columns, strict=True)
        ],
        "distance matmul": lambda: [
            operand_distances(patch_operand[image : image + 1, a : a + rows].reshape(-1, width), center_operand, False)
            for image in range(batch)
            for a in range(0, num_patches, rows)
        ],
        "gradient matmul": lambda: [g @ center_operand for g in gradients],
    }
    return {name: statistics.median(values) for name, values in round_robin(kinds, repeats).items()}


def model_grid(model: AdfaModel) -> tuple[int, int]:
    side = math.isqrt(model.centers.shape[0])
    return side, side


def latency(batch: int, repeats: int) -> float:
    """Eval-mode seconds per image of the whole torch model (backbone included), WR50, reference mode."""
    model = build_model(WR50)
    images = load_images(batch)
    with torch.no_grad():
        model.set_centers(model.describe(model.extract_features(images[:1])).mean(dim=0).flatten(1).T)
        return timed(lambda: model(images), repeats) / batch


def memory_run(batch: int) -> None:
    """One BrainMRI-sized epoch (58 images): cache fill, centres, training steps; prints the peak RSS."""
    torch.manual_seed(0)
    model = build_model(WR50)
    images = load_images(BRAINMRI_TRAIN_IMAGES)
    cache = FeatureCache()
    cache.bind("memory-run")
    keys = [f"image-{index}" for index in range(images.shape[0])]
    starts = range(0, images.shape[0], batch)
    total = None
    with torch.no_grad():
        for start in starts:
            features = model.extract_features(images[start : start + batch])
            cache.put(keys[start : start + batch], features)
            part = model.describe(features).sum(dim=0)
            total = part if total is None else total + part
    model.set_centers((total / images.shape[0]).flatten(1).T)
    model.train()
    step = our_step(model, cache)
    for start in starts:
        step(keys[start : start + batch])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak_rss_gib={peak:.2f} cache_gib={cache.nbytes / 1024**3:.3f}")


def report(name: str, result: dict[str, object], batch: int, sinkhorn_rows: int) -> dict[str, bool]:
    """Print one dimension set's lines; return whether each mode met its target."""
    times, ratios = result["times"], result["ratios"]
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"[{name}] s/step (batch {batch}), median [min, max]:", *(f"{key}={spread(times[key])}" for key in times))
    print(
        f"[{name}] ours/floor, median of per-round ratios [min, max]: "
        + " ".join(f"{mode}={spread(ratios[mode])}" for mode in TOPK_MODES)
        + f"; reference vs floor_decomposed {relative(times, 'reference', 'floor_decomposed'):.2f}"
        + f", vs floor_naive {relative(times, 'reference', 'floor_naive'):.2f}"
    )
    for mode in TOPK_MODES:
        passes = result["passes"][mode]
        print(
            f"[{name}] passes over the block per step, {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in passes.items())
        )
    pass_seconds = result["pass_times"]
    exp_seconds = pass_seconds["torch.exp"]
    print(
        f"[{name}] one pass over the batch's block (s) and its ratio to torch.exp over the same chunks: "
        + ", ".join(f"{k} {v:.4f} ({v / exp_seconds:.2f})" for k, v in pass_seconds.items())
    )
    print(
        f"[{name}] public algorithm: sinkhorn fwd+bwd {result['sinkhorn']:.2f} s/step (timed on "
        f"{sinkhorn_rows} patch rows of one image, scaled to {batch} images) + floor = "
        f"{result['reference_algorithm']:.2f} s/step; public algorithm / ours (reference) = "
        f"{result['reference_algorithm'] / median['reference']:.1f}"
    )
    print(
        f"[{name}] loss check on those rows, public normaliser of the whole image: "
        f"public={result['loss_public']:.6g} "
        f"ours(fused)={result['loss_ours']:.6g} ours(plain)={result['loss_ours_plain']:.6g} "
        f"rel_diff={result['loss_rel_diff']:.2e}"
    )
    return {mode: statistics.median(ratios[mode]) <= TARGETS[mode] for mode in TOPK_MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per step variant")
    parser.add_argument("--sinkhorn-rows", type=int, default=196, help="patch rows timed for (b)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--dims",
        nargs="+",
        choices=("Lite0", "WR50"),
        default=["Lite0", "WR50"],
        help="dimension sets to time; without WR50 the latency, memory and summary lines are skipped",
    )
    parser.add_argument("--memory-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_run:
        memory_run(args.batch)
        return
    torch.set_grad_enabled(True)
    compiled = "torch.compile" if not chunk_kernels.ChunkKernel.compiler_failed else "eager"
    print(
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, chunks of "
        f"{default_chunk_elements(torch.float32) / 2**20:.1f} M elements, "
        f"commit {commit()}, command: python -m benchmarks.train_speed {' '.join(sys.argv[1:])}".rstrip()
    )
    per_epoch = BRAINMRI_TRAIN_IMAGES / args.batch
    met = {}
    for name, arch in (("Lite0", LITE0), ("WR50", WR50)):
        if name not in args.dims:
            continue
        result = speed(arch, args.batch, args.repeats, args.sinkhorn_rows)
        met[name] = report(name, result, args.batch, args.sinkhorn_rows)
        if name == "WR50":
            wr50 = result
    kernels = "eager (no working C++ compiler)" if chunk_kernels.ChunkKernel.compiler_failed else compiled
    print(f"chunk kernels ran {kernels}")
    if "WR50" not in args.dims:
        return
    for batch in (1, 8):
        print(f"[WR50] eval latency, batch {batch}: {latency(batch, args.repeats):.3f} s/image (backbone included)")
    memory = subprocess.run(
        [
            sys.executable,
            *("-m", "benchmarks.train_speed", "--memory-run", "--batch", str(args.batch)),
            *("--threads", str(torch.get_num_threads())),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"[WR50] BrainMRI-sized training run (58 images, batch {args.batch}): {memory.stdout.strip()}")
    for name, mode_met in met.items():
        print(
            f"targets [{name}]: "
            + ", ".join(f"{mode} <= {TARGETS[mode]}: {'met' if ok else 'NOT met'}" for mode, ok in mode_met.items())
        )
    reference = statistics.median(wr50["times"]["reference"])
    print(
        f"ratio_reference_over_ours={wr50['reference_algorithm'] / reference:.1f} "
        f"ratio_ours_over_floor={statistics.median(wr50['ratios']['reference']):.2f} "
        f"s_per_epoch_brainmri={reference * per_epoch:.1f}"
    )


if __name__ == "__main__":
    main()
