"""Offline synthetic head-MRI-like dataset: deformed Shepp-Logan phantoms with and without lesions.

Normal images are Shepp-Logan head phantoms (``skimage.data.shepp_logan_phantom``) with per-image tissue contrast,
a random affine + elastic deformation, scanner blur, a smooth multiplicative bias field and Rician noise. Anomalous
images are made the same way after inserting one lesion inside the brain: a bright, dark or ring-enhancing blob with
an irregular, soft boundary and some internal texture. Lesions are inserted before deformation and acquisition
effects, so they are deformed, blurred and noisy like the anatomy around them.

The dataset is written in the layout of anomalib's ``Folder`` datamodule::

    root/train/good/good_000.png          normal training images
    root/test/good/good_000.png           normal test images
    root/test/lesion/lesion_000.png       anomalous test images
    root/ground_truth/lesion/lesion_000.png   binary lesion masks (0 / 255)

All images are 8-bit grayscale PNGs. Each image is drawn from its own generator seeded by ``(seed, split, index)``,
so the same call always writes the same bytes and changing one count does not change the other splits.

Example:
    >>> from anomalib_adfa.synthetic import make_phantom_dataset
    >>> dataset = make_phantom_dataset("datasets/phantom", seed=0)
    >>> sorted(p.name for p in dataset.abnormal_dir.iterdir())[:2]
    ['lesion_000.png', 'lesion_001.png']
"""

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.data import shepp_logan_phantom
from skimage.transform import resize

NORMAL_DIR = "train/good"
NORMAL_TEST_DIR = "test/good"
ABNORMAL_DIR = "test/lesion"
MASK_DIR = "ground_truth/lesion"
LESION_KINDS = ("bright", "dark", "ring")

# Intensity levels of skimage's phantom; 0 occurs both outside the head and in the two ventricles.
_PHANTOM_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 1.0)
# Displayed intensity of: background, ventricles, then the non-zero phantom levels (a T1-like window that makes
# brain tissue mid-grey rather than nearly black).
_TISSUE_CONTRAST = np.array([0.0, 0.14, 0.30, 0.44, 0.56, 0.66, 0.86])
# The phantom fills this fraction of the frame, leaving room for deformations.
_HEAD_FRACTION = 0.84
# Folder -> file name stem; files are named <stem>_<index:03d>.png.
_FILE_STEMS = {NORMAL_DIR: "good", NORMAL_TEST_DIR: "good", ABNORMAL_DIR: "lesion", MASK_DIR: "lesion"}


@dataclass(frozen=True)
class PhantomDataset:
    """Paths of a dataset written by :func:`make_phantom_dataset`, ready for ``anomalib.data.Folder``.

    Attributes:
        root: Dataset root.
        normal_dir: Normal training images.
        normal_test_dir: Normal test images.
        abnormal_dir: Anomalous test images.
        mask_dir: Lesion masks, named like the anomalous images.
    """

    root: Path
    normal_dir: Path
    normal_test_dir: Path
    abnormal_dir: Path
    mask_dir: Path


@dataclass(frozen=True)
class _Anatomy:
    """Canonical (undeformed) phantom at the output size.

    Attributes:
        membership: Soft tissue-class membership of shape ``(7, S, S)``; classes as in ``_TISSUE_CONTRAST``.
        head: Inside the outer skull boundary, shape ``(S, S)``.
        brain_depth: Distance in pixels to the nearest non-brain pixel (skull or outside), shape ``(S, S)``.
    """

    membership: np.ndarray
    head: np.ndarray
    brain_depth: np.ndarray


@lru_cache(maxsize=4)
def _anatomy(size: int) -> _Anatomy:
    phantom = shepp_logan_phantom()
    head = ndimage.binary_fill_holes(phantom > 0.5)  # the skull is the only level above 0.5
    levels = np.abs(phantom[None] - np.array(_PHANTOM_LEVELS)[:, None, None]).argmin(axis=0)
    classes = np.where(head, levels + 1, 0)
    inner = round(size * _HEAD_FRACTION)
    offset = (size - inner) // 2
    membership = np.zeros((len(_TISSUE_CONTRAST), size, size), dtype=np.float32)
    for index in range(len(_TISSUE_CONTRAST)):
        membership[index, offset : offset + inner, offset : offset + inner] = resize(
            (classes == index).astype(np.float32), (inner, inner), order=1, anti_aliasing=True
        )
    membership[0] += 1.0 - membership.sum(axis=0)
    head_mask = membership[0] < 0.5
    skull = membership[-1] > 0.25
    brain = head_mask & ~ndimage.binary_dilation(skull, iterations=1)
    return _Anatomy(membership=membership, head=head_mask, brain_depth=ndimage.distance_transform_edt(brain))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise of shape ``(H, W)`` scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return field / field.std()


def _insert_lesion(rng: np.random.Generator, image: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add one lesion fully inside a region.

    Args:
        rng: Random generator.
        image: Image of shape ``(H, W)`` with intensities in ``[0, 1]``.
        depth: Distance in pixels to the nearest pixel outside the region (the brain for the phantom), ``(H, W)``.

    Returns:
        The image with the lesion, and the lesion's soft support of shape ``(H, W)`` in ``[0, 1]``.

    Raises:
        ValueError: If the region is too thin to hold a lesion.
    """
    size = min(image.shape)
    radius = max(rng.uniform(0.06, 0.1) * size, 6.0)
    # Irregular outline: a randomly stretched ellipse whose radius is modulated by a few low angular harmonics.
    stretch = rng.uniform(0.75, 1.25)
    tilt = rng.uniform(0, np.pi)
    harmonics = [(k, rng.uniform(0, 0.22) / k, rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
    edge = rng.uniform(0.8, 1.8)

    def outline(angle: np.ndarray) -> np.ndarray:
        return 1.0 + sum(amplitude * np.cos(k * angle + phase) for k, amplitude, phase in harmonics)

    # Keep the whole lesion, soft edge included, inside the brain.
    reach = outline(np.linspace(0, 2 * np.pi, 360)).max() * max(stretch, 1 / stretch) ** 0.5
    radius = min(radius, (depth.max() - 1 - 3 * edge) / reach)  # only binds for small images or regions
    extent = radius * reach + 3 * edge
    candidates = np.argwhere(depth > extent)
    if radius < 1 or not len(candidates):
        msg = f"the region is too thin for a lesion (deepest point {depth.max():.1f} px from its edge)"
        raise ValueError(msg)
    centre_y, centre_x = candidates[rng.integers(len(candidates))]
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]].astype(np.float64)
    dy, dx = yy - centre_y, xx - centre_x
    along = dx * np.cos(tilt) + dy * np.sin(tilt)
    across = -dx * np.sin(tilt) + dy * np.cos(tilt)
    distance = np.hypot(along * np.sqrt(stretch), across / np.sqrt(stretch)) / outline(np.arctan2(dy, dx))

    def profile(scale: float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp((distance - radius * scale) / edge))

    support = profile(1.0)
    texture = 1.0 + 0.2 * _smooth_noise(rng, image.shape, sigma=radius / 4)
    kind = LESION_KINDS[rng.integers(len(LESION_KINDS))]
    if kind == "bright":
        change = rng.uniform(0.24, 0.36) * support * texture
    elif kind == "dark":
        change = -rng.uniform(0.22, 0.3) * support * texture
    else:
        core = profile(rng.uniform(0.5, 0.7))
        change = rng.uniform(0.3, 0.4) * (support - core) * texture - rng.uniform(0.16, 0.24) * core
    return np.clip(image + change, 0.0, 1.0), support


def body_region(gray: np.ndarray, level: float = 0.2) -> np.ndarray:
    """Find the imaged body: smoothed intensity above ``level`` of its 99th percentile, holes filled, largest part.

    Args:
        gray: Grayscale image of shape ``(H, W)`` in ``[0, 1]``.
        level: Fraction of the 99th-percentile intensity that separates body from background.

    Returns:
        Boolean mask of shape ``(H, W)``.
    """
    smooth = ndimage.gaussian_filter(gray.astype(np.float64), sigma=max(min(gray.shape) / 100, 1.0))
    region = ndimage.binary_fill_holes(smooth > level * np.percentile(smooth, 99))
    labels, count = ndimage.label(region)
    if count > 1:
        region = labels == np.bincount(labels.ravel())[1:].argmax() + 1
    return region


def implant_lesion(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Implant one phantom-style lesion inside the body region of a real image (a lesion-like validation anomaly).

    The lesion is the phantom generator's (an irregular, soft-edged blob, bright, dark or ring-enhancing, with
    internal texture), placed so that all of it lies inside :func:`body_region`, and added to every channel alike.

    Args:
        image: Image of shape ``(H, W)`` or ``(H, W, C)`` with intensities in ``[0, 1]``.
        rng: Random generator (one per image makes the set reproducible).

    Returns:
        The image with the lesion (same shape, in ``[0, 1]``) and its mask ``(H, W)`` (support above 0.5).

    Raises:
        ValueError: If the image is not 2-D or 3-D, or its body region is too thin to hold a lesion.
    """
    if image.ndim not in {2, 3}:
        msg = f"implant_lesion expects an (H, W) or (H, W, C) image, got shape {image.shape}"
        raise ValueError(msg)
    gray = image if image.ndim == 2 else image.mean(axis=2)
    depth = ndimage.distance_transform_edt(body_region(gray))
    changed, support = _insert_lesion(rng, gray, depth)
    change = changed - gray
    result = np.clip(image + (change if image.ndim == 2 else change[..., None]), 0.0, 1.0)
    return result, support > 0.5


def _warp_coordinates(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return sampling coordinates of a random affine + elastic deformation, shape ``(2, S, S)``."""
    centre = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - centre
    angle = np.deg2rad(rng.uniform(-8, 8))
    scale_y, scale_x = rng.uniform(0.94, 1.05, size=2)
    cos, sin = np.cos(angle), np.sin(angle)
    shift_y, shift_x = rng.uniform(-0.03, 0.03, size=2) * size
    source_y = (cos * yy - sin * xx) / scale_y + centre + shift_y
    source_x = (sin * yy + cos * xx) / scale_x + centre + shift_x
    strength = rng.uniform(0.008, 0.016) * size
    source_y += strength * _smooth_noise(rng, (size, size), sigma=size * 0.09)
    source_x += strength * _smooth_noise(rng, (size, size), sigma=size * 0.09)
    return np.stack([source_y, source_x])


def _render(rng: np.random.Generator, size: int, abnormal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image.

    Args:
        rng: Random generator for this image.
        size: Image side in pixels.
        abnormal: Insert a lesion.

    Returns:
        8-bit image of shape ``(S, S)`` and boolean lesion mask of shape ``(S, S)`` (all False if normal).
    """
    anatomy = _anatomy(size)
    contrast = _TISSUE_CONTRAST * rng.normal(1.0, 0.05, size=_TISSUE_CONTRAST.shape)
    image = np.tensordot(contrast, anatomy.membership, axes=1)
    image *= 1.0 + 0.04 * _smooth_noise(rng, (size, size), sigma=1.5) * anatomy.head
    support = np.zeros_like(image)
    if abnormal:
        image, support = _insert_lesion(rng, image, anatomy.brain_depth)
    coordinates = _warp_coordinates(rng, size)
    image = ndimage.map_coordinates(image, coordinates, order=1, cval=0.0)
    head = ndimage.map_coordinates(anatomy.head.astype(np.float64), coordinates, order=1) > 0.5
    mask = (ndimage.map_coordinates(support, coordinates, order=1) > 0.5) & head
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.4, 0.9))
    bias = np.exp(rng.uniform(0.06, 0.15) * _smooth_noise(rng, (size, size), sigma=size * 0.25))
    image = np.clip(image * bias * rng.uniform(0.9, 1.1), 0.0, 1.0) ** rng.uniform(0.85, 1.15)
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
    sigma = rng.uniform(0.015, 0.035)
    image = np.hypot(image + sigma * rng.standard_normal(image.shape), sigma * rng.standard_normal(image.shape))
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mask


def _prepare(directory: Path, stem: str, overwrite: bool) -> None:
    """Create ``directory``, or empty it of images written by an earlier call; never delete anything else."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = list(directory.iterdir())
    if not existing:
        return
    foreign = [path.name for path in existing if not re.fullmatch(rf"{stem}_\d{{3,}}\.png", path.name)]
    if foreign:
        shown = ", ".join(sorted(foreign)[:3])
        msg = f"{directory} holds files this generator did not write ({shown}); use another root."
        raise FileExistsError(msg)
    if not overwrite:
        msg = f"{directory} already holds a phantom dataset; pass overwrite=True to replace it."
        raise FileExistsError(msg)
    for path in existing:
        path.unlink()


def make_phantom_dataset(
    root: str | Path,
    n_train: int = 40,
    n_test_normal: int = 20,
    n_test_abnormal: int = 20,
    image_size: int = 160,
    seed: int = 0,
    overwrite: bool = False,
) -> PhantomDataset:
    """Write a deterministic synthetic head-phantom anomaly dataset in anomalib's ``Folder`` layout.

    Args:
        root: Dataset root; created if missing.
        n_train: Number of normal training images.
        n_test_normal: Number of normal test images.
        n_test_abnormal: Number of test images with one lesion each (and one mask each).
        image_size: Side of the square images in pixels (at least 64).
        seed: Seed; the same arguments always give byte-identical files.
        overwrite: Replace the images of an earlier call in the same ``root``. Only files named like this
            generator's images are ever deleted.

    Returns:
        The dataset's paths.

    Raises:
        ValueError: If a count or the seed is negative, or ``image_size`` is below 64.
        FileExistsError: If a dataset folder already holds images and ``overwrite`` is False, or holds any other
            file.
    """
    if min(n_train, n_test_normal, n_test_abnormal) < 0:
        msg = f"Image counts must not be negative, got {n_train}, {n_test_normal}, {n_test_abnormal}."
        raise ValueError(msg)
    if seed < 0:
        msg = f"seed must not be negative, got {seed}."
        raise ValueError(msg)
    if image_size < 64:  # smaller images leave no room for a visible lesion
        msg = f"image_size must be at least 64 pixels, got {image_size}."
        raise ValueError(msg)
    root = Path(root)
    dataset = PhantomDataset(
        root=root,
        normal_dir=root / NORMAL_DIR,
        normal_test_dir=root / NORMAL_TEST_DIR,
        abnormal_dir=root / ABNORMAL_DIR,
        mask_dir=root / MASK_DIR,
    )
    for folder, stem in _FILE_STEMS.items():
        _prepare(root / folder, stem, overwrite)
    counts = {NORMAL_DIR: n_train, NORMAL_TEST_DIR: n_test_normal, ABNORMAL_DIR: n_test_abnormal}
    for split_code, (split, count) in enumerate(counts.items()):
        abnormal = split == ABNORMAL_DIR
        for index in range(count):
            rng = np.random.default_rng([seed, split_code, index])
            image, mask = _render(rng, image_size, abnormal)
            name = f"{_FILE_STEMS[split]}_{index:03d}.png"
            Image.fromarray(image).save(root / split / name)
            if abnormal:
                Image.fromarray(mask.astype(np.uint8) * 255).save(dataset.mask_dir / name)
    return dataset
