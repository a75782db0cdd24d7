"""Training-step speed of ADFA against the public soft top-k and against the unavoidable work.

Measured side by side in one process, on the same cached features, at the paper's dimensions
(WR50 layer1-3 shapes at 224 px: 56x56 = 3136 patches and centres, D = 1792, D' = 448, K = 3,
batch 10; the backbone has random weights, which changes the values but not the work):

(a) our training step, features read from the :class:`~anomalib_adfa.feature_cache.FeatureCache`
    (half precision), descriptor, fused scores, loss, backward and AdamW step, in every mode;
(b) the public algorithm: 200 Sinkhorn scalings of the ``(B*T, N, 2)`` plan with the public cost
    ``C = (d - a)^2 / max C`` (batch-wide max), forward and implicit backward, written here from the
    paper. It is timed on a slice of patch rows (the rows are independent problems, so the time is
    linear in them) and scaled to the batch, then added to the floor below;
(c) the floor: the 1x1 descriptor convolution of the concatenated features and the patch-to-centre
    distances at their minimal cost (one matmul per chunk forward, one backward), nothing else. Two more
    floors are printed for context: with our per-layer projection (stricter) and with the naive autograd
    distances (full-size intermediates; looser).

It also checks that (a) in reference mode gives the loss of (b) on the same rows of one image (where
the batch-wide and per-image normalisations coincide), measures the peak resident memory of a
BrainMRI-sized training run (58 images, in a child process) and the eval-mode latency per image.

The last line reads ``ratio_reference_over_ours=<x> ratio_ours_over_floor=<y> s_per_epoch_brainmri=<z>``.

Usage::

    nice .venv/bin/python -m benchmarks.train_speed
"""

from __future__ import annotations

import argparse
import functools
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from anomalib_adfa.backbones import LITE0_BACKBONE, LITE0_LAYERS
from anomalib_adfa.feature_cache import FeatureCache
from anomalib_adfa.patch_scoring import CHUNK_ELEMENTS, PatchScorer, distance_operands, operand_distances
from anomalib_adfa.reference import plain_distances, topk_weights
from anomalib_adfa.soft_topk import TOPK_MODES, TopKSettings
from anomalib_adfa.torch_model import AdfaModel

WR50 = ("wide_resnet50_2", ("layer1", "layer2", "layer3"))
LITE0 = (LITE0_BACKBONE, LITE0_LAYERS)
BRAINMRI_TRAIN_IMAGES = 58
SINKHORN_ITERATIONS = 200
EPSILON = 0.1
FLOORS = ("floor", "floor_decomposed", "floor_naive")


def timed(step: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of ``step`` over ``repeats`` runs after a warm-up (the run least disturbed by other load)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


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

    Forward computes (and drops) every chunk of the ``(B, T, N)`` distance matrix; backward pushes a dense
    ``(B, t, N)`` gradient of ones through each chunk. No selection, no weighting: the work any exact ADFA
    step must do on the distances.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        patch_operand, center_operand = distance_operands(patches, centers)
        rows = max(1, CHUNK_ELEMENTS // (patches.shape[0] * centers.shape[0]))
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
    distances of :func:`~anomalib_adfa.reference.plain_distances` (full-size intermediate tensors, as a naive
    implementation).
    """
    describe = model.describe if variant == "floor_decomposed" else model.descriptor

    def step() -> None:
        patches = describe(features).flatten(2).transpose(1, 2)
        total = (
            plain_distances(patches, model.centers, "kl_weighted").sum()
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


def speed(arch: tuple[str, tuple[str, ...]], batch: int, repeats: int, sinkhorn_rows: int) -> dict[str, float]:
    """Seconds per training step of (a) each mode, (b) the public algorithm, (c) the floor."""
    torch.manual_seed(0)
    model = build_model(arch)
    images = load_images(batch)
    with torch.no_grad():
        cache, keys = cached_batch(model, images)
        features = cache.get(keys, torch.device("cpu"), torch.float32)
        model.set_centers(model.describe(features).mean(dim=0).flatten(1).T)
    model.train()
    results: dict[str, float] = {}
    for mode in TOPK_MODES:
        model.scorer = PatchScorer(3, mode)
        results[mode] = timed(functools.partial(our_step(model, cache), keys), repeats)
    model.scorer = PatchScorer(3, "reference")
    for variant in FLOORS:
        results[variant] = timed(floor_step(model, features, variant), repeats)

    # (b) on `sinkhorn_rows` patch rows of the first image, scaled to the batch's B*T rows.
    with torch.no_grad():
        patches = model.describe([feature[:1] for feature in features]).flatten(2).transpose(1, 2)
        distances = plain_distances(patches, model.centers, "kl_weighted")[0]
    rows = distances[:sinkhorn_rows]
    num_rows = batch * distances.shape[0]
    results["sinkhorn"] = timed(reference_step(rows, 3), 1) * num_rows / rows.shape[0]
    results["reference_algorithm"] = results["floor"] + results["sinkhorn"]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sinkhorn-rows", type=int, default=196, help="patch rows timed for (b)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--memory-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_run:
        memory_run(args.batch)
        return
    torch.set_grad_enabled(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    per_epoch = BRAINMRI_TRAIN_IMAGES / args.batch
    for name, arch in (("Lite0", LITE0), ("WR50", WR50)):
        result = speed(arch, args.batch, args.repeats, args.sinkhorn_rows)
        keys = (*TOPK_MODES, *FLOORS)
        print(f"[{name}] s/step (batch {args.batch}):", *(f"{key}={result[key]:.3f}" for key in keys))
        print(
            f"[{name}] public algorithm: sinkhorn fwd+bwd {result['sinkhorn']:.2f} s/step (timed on "
            f"{args.sinkhorn_rows} patch rows of one image, scaled to {args.batch} images) + floor = "
            f"{result['reference_algorithm']:.2f} s/step"
        )
        print(
            f"[{name}] loss check on those rows, public normaliser of the whole image: "
            f"public={result['loss_public']:.6g} "
            f"ours(fused)={result['loss_ours']:.6g} ours(plain)={result['loss_ours_plain']:.6g} "
            f"rel_diff={result['loss_rel_diff']:.2e}"
        )
        print(
            f"[{name}] ours/floor: "
            + " ".join(f"{mode}={result[mode] / result['floor']:.2f}" for mode in TOPK_MODES)
            + f" (reference vs floor_decomposed: {result['reference'] / result['floor_decomposed']:.2f}, "
            + f"vs floor_naive: {result['reference'] / result['floor_naive']:.2f})"
            + f"; reference_algorithm/ours(reference)={result['reference_algorithm'] / result['reference']:.1f}"
            + f"; s/epoch BrainMRI (58 images, reference)={result['reference'] * per_epoch:.1f}"
        )
        if name == "WR50":
            wr50 = result
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
    print(
        f"ratio_reference_over_ours={wr50['reference_algorithm'] / wr50['reference']:.1f} "
        f"ratio_ours_over_floor={wr50['reference'] / wr50['floor']:.2f} "
        f"s_per_epoch_brainmri={wr50['reference'] * per_epoch:.1f}"
    )


if __name__ == "__main__":
    main()
