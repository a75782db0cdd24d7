"""Shared pytest fixtures: paths to the real medical images, and small tested runs with masks."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine

from anomalib_adfa import Adfa
from anomalib_adfa.callbacks import EvaluationRecorder
from anomalib_adfa.data import BUSI
from anomalib_adfa.synthetic import make_phantom_dataset
from anomalib_adfa.weights import efficientnet_lite0_weights

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_dataset(relative: str) -> Path:
    """Return ``../shared/data/<relative>`` or skip the calling test when it is absent."""
    path = SHARED_DATA / relative
    if not path.is_dir():
        pytest.skip(f"real images not available: {path} is missing (see ../shared/data/README.md)")
    return path


BFLOAT16_SCORE_BOUND = 0.05
"""Largest normalised-score change bfloat16 OpenVINO inference may make (README: "One image, one decision")."""


@pytest.fixture(scope="session")
def bfloat16_bound() -> float:
    """:data:`BFLOAT16_SCORE_BOUND`; an image farther than it from the threshold (0.5) must keep its label."""
    return BFLOAT16_SCORE_BOUND


@pytest.fixture(scope="session")
def openvino_default_is_bfloat16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bfloat16 by default here (a CPU with native bfloat16)."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT") == ov.Type.bf16


@pytest.fixture(scope="session")
def brainmri_root() -> Path:
    """Root of the real BrainMRI download (``no/``, ``yes/``)."""
    return shared_dataset("brain_tumor_dataset")


@pytest.fixture(scope="session")
def covid_root() -> Path:
    """Root of the real Covid download (``train/``, ``test/``)."""
    return shared_dataset("covid19_xray/xray_dataset_covid19")


@pytest.fixture(scope="session")
def busi_sample_root() -> Path:
    """Root of the small real BUSI sample (``normal/``, ``benign/``, ``malignant/``)."""
    return shared_dataset("busi_sample/Dataset_BUSI_with_GT")


PATIENT_NAME = "Doe^Recognisable^Patientname"
"""Patient name of every DICOM file that :func:`write_dicom` makes; no output may contain it."""


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    compress: str | None = None,
    **tags: object,
) -> Path:
    """Write ``pixels`` as a DICOM Part 10 file (secondary capture) with patient tags and any extra ``tags``.

    Args:
        path: File to write (any name; DICOM is recognised by content).
        pixels: ``uint8``/``uint16``/``int16`` array, ``(H, W)``, ``(frames, H, W)`` or ``(H, W, 3)``.
        photometric: Photometric Interpretation.
        bits_stored: Bits Stored (default: the dtype's size).
        compress: Transfer syntax UID to compress with (pydicom encodes RLE Lossless natively).
        **tags: Extra data elements by keyword (``RescaleSlope=2``, ``WindowCenter=[..]``...).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = "PID-0451-RECOGNISABLE"
    dataset.PatientBirthDate = "19230405"
    dataset.Modality = "OT"
    dataset.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    if compress is not None:
        dataset.compress(compress)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def dicom_writer() -> Callable[..., Path]:
    """:func:`write_dicom`, for tests that build DICOM files (skips when pydicom is not installed)."""
    pytest.importorskip("pydicom", reason="the dicom extra is not installed: pip install 'anomalib-adfa[dicom]'")
    return write_dicom


@pytest.fixture(scope="session")
def dicom_patient_name() -> str:
    """The patient name written into every file :func:`write_dicom` makes."""
    return PATIENT_NAME


@pytest.fixture(scope="session")
def grey_slices(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Two 8-bit grey 80 x 96 images: real chest X-rays (Covid), or synthetic head phantoms when they are absent."""
    from PIL import Image

    from anomalib_adfa.synthetic import make_phantom_dataset

    folder = SHARED_DATA / "covid19_xray" / "xray_dataset_covid19" / "test" / "NORMAL"
    paths = sorted(folder.glob("*.jp*g"))[:2] if folder.is_dir() else []
    if not paths:
        dataset = make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), 2, 1, 1, image_size=64, seed=0)
        paths = sorted(dataset.normal_dir.iterdir())
    slices = []
    for path in paths:
        with Image.open(path) as image:
            slices.append(np.asarray(image.convert("L").resize((96, 80))))
    return slices


def dicom_copy(png: Path, target_dir: Path, variant: int) -> Path:
    """Write a DICOM copy of an 8-bit grey PNG that the reader must load as the same tensor.

    ``variant`` 0: 8-bit MONOCHROME2 ``.dcm``; 1: MONOCHROME1 (stored values inverted) with no extension;
    2: 16-bit MONOCHROME2 ``.dcm`` scaled by 257, read over the full 16-bit range.
    """
    from PIL import Image

    with Image.open(png) as image:
        grey = np.asarray(image.convert("L"))
    if variant == 0:
        return write_dicom(target_dir / f"{png.stem}.dcm", grey)
    if variant == 1:
        return write_dicom(target_dir / png.stem, 255 - grey, "MONOCHROME1")
    return write_dicom(target_dir / f"{png.stem}.dcm", grey.astype(np.uint16) * 257)


@pytest.fixture(scope="session")
def phantom_pngs(tmp_path_factory: pytest.TempPathFactory):
    """A tiny phantom dataset: 6 normal training, 3 normal and 3 lesion test PNGs of 64 px, with lesion masks."""
    from anomalib_adfa.synthetic import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom_png"), 6, 3, 3, image_size=64, seed=0)


@pytest.fixture(scope="session")
def phantom_dicoms(phantom_pngs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DICOM copies of :func:`phantom_pngs` in the same layout (``train/good``, ``test/good``, ``test/lesion``),
    cycling through the three :func:`dicom_copy` variants; the lesion masks stay PNG in ``ground_truth/lesion``.
    """
    pytest.importorskip("pydicom", reason="the dicom extra is not installed: pip install 'anomalib-adfa[dicom]'")
    root = tmp_path_factory.mktemp("phantom_dicom")
    for folder in (phantom_pngs.normal_dir, phantom_pngs.normal_test_dir, phantom_pngs.abnormal_dir):
        target = root / folder.relative_to(phantom_pngs.root)
        for index, png in enumerate(sorted(folder.glob("*.png"))):
            dicom_copy(png, target, index % 3)
    masks = root / phantom_pngs.mask_dir.relative_to(phantom_pngs.root)
    masks.mkdir(parents=True)
    for mask in phantom_pngs.mask_dir.glob("*.png"):
        (masks / mask.name).write_bytes(mask.read_bytes())
    return root


@pytest.fixture(scope="session")
def localisation_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ADFA (Lite0, 1 epoch, 64 px) tested with masks and a EvaluationRecorder, on the phantom set and the BUSI sample.

    Returns:
        Run folder of each data source that exists (``"phantom"`` always; ``"busi_sample"`` when present), each
        holding ``report_data/``, ``metrics.json`` (the metrics ``Engine.test`` returned) and ``raw_maps.pt``
        (the recorder's raw maps and masks, as compared).
    """
    root = tmp_path_factory.mktemp("localisation")
    phantom = make_phantom_dataset(root / "phantom_data", n_train=6, n_test_normal=3, n_test_abnormal=4, image_size=64)
    datamodules = {
        "phantom": Folder(
            name="phantom",
            root=phantom.root,
            normal_dir="train/good",
            abnormal_dir="test/lesion",
            normal_test_dir="test/good",
            mask_dir="ground_truth/lesion",
            train_batch_size=8,
            eval_batch_size=8,
            num_workers=0,
            val_split_mode="same_as_test",
        )
    }
    busi = SHARED_DATA / "busi_sample" / "Dataset_BUSI_with_GT"
    if busi.is_dir():
        datamodules["busi_sample"] = BUSI(root=busi, train_batch_size=8, eval_batch_size=4)
    runs = {}
    for name, datamodule in datamodules.items():
        model = Adfa(
            backbone="tf_efficientnet_lite0",
            layers=("blocks.1", "blocks.2", "blocks.4"),
            backbone_weights=efficientnet_lite0_weights(),
            topk_mode="hard",
            image_size=(72, 72),
            center_crop_size=(64, 64),
            visualizer=False,
        )
        run = root / name
        recorder = EvaluationRecorder(output_dir=run)
        engine = Engine(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            default_root_dir=run,
            callbacks=[recorder],
        )
        engine.fit(model, datamodule=datamodule)
        metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
        (run / "metrics.json").write_text(json.dumps({key: float(value) for key, value in metrics.items()}))
        torch.save({"maps": torch.cat(recorder.maps), "masks": torch.cat(recorder.masks)}, run / "raw_maps.pt")
        runs[name] = run
    return runs


def _chunk_inputs(rows: int, columns: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Raw distances with a few rounding negatives, and per-row threshold, slope and shift."""
    generator = torch.Generator().manual_seed(seed)
    distances = torch.rand(rows, columns, generator=generator, dtype=dtype) * 4.0
    distances[:, :3] = torch.tensor([-1e-7, 0.0, 1e-3], dtype=dtype)
    beta = torch.randn(rows, 1, generator=generator, dtype=dtype)
    slope = torch.rand(rows, 1, generator=generator, dtype=dtype) * 5.0 + 0.1
    shift = distances.mean(dim=-1, keepdim=True)
    return distances, beta, slope, shift


@pytest.fixture(scope="session")
def chunk_inputs() -> Callable[..., tuple[torch.Tensor, ...]]:
    """``chunk_inputs(rows, columns, dtype, seed)``: inputs of the chunk kernels (raw distances and per-row columns)."""
    return _chunk_inputs


def _adfa_like(batch: int, patches: int, channels: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Descriptors scattered around one centre per position, as after ADFA's centre initialisation."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(patches, channels, generator=generator, dtype=dtype)
    noise = torch.randn(batch, patches, channels, generator=generator, dtype=dtype)
    upstream = torch.randn(batch, patches, generator=generator, dtype=dtype)
    return (centers + 0.5 * noise).requires_grad_(), centers, upstream


@pytest.fixture(scope="session")
def adfa_like() -> Callable[..., tuple[torch.Tensor, ...]]:
    """``adfa_like(batch, patches, channels, dtype, seed)``: patches ``(B, T, D')`` with grad, centres, upstream."""
    return _adfa_like
