"""The soft top-k's row sums, gradient pass and row extremes in C (``row_kernels.c``), built by the system's compiler.

:data:`~anomalib_adfa.chunk_kernels.weight_sums`, :data:`~anomalib_adfa.chunk_kernels.sums_and_gradient` and
:data:`~anomalib_adfa.chunk_kernels.row_extremes` run here for float32 CPU chunks: the first two about twice as
fast as Inductor's code for the same formulas (the reason is in ``row_kernels.c``). The library is compiled once
per machine with ``-O3 -march=native`` and OpenMP (the thread team of PyTorch's own OpenMP runtime, with its
thread count), and kept in the user cache directory under a name that hashes the source, the compiler, the CPU's
flags and the PyTorch install; a compiler that is missing or fails leaves the compiled PyTorch kernels in charge
(one warning). ``ANOMALIB_ADFA_NATIVE=0`` switches this off, and the compiler is ``$CC`` if set, else ``cc``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import platformdirs
import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("row_kernels.c")

ENVIRONMENT_SWITCH = "ANOMALIB_ADFA_NATIVE"

_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC")


def _cpu_flags() -> str:
    """Return the CPU's feature flags (Linux), which ``-march=native`` compiles for, or the processor's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, target: Path) -> None:
    """Compile :data:`SOURCE` into ``target``, linked to PyTorch's OpenMP runtime where it ships one."""
    torch_lib = Path(torch.__file__).parent / "lib"
    # Like Inductor's kernels: the OpenMP runtime that PyTorch loaded serves this library's parallel loops too.
    runtime = [f"-Wl,-rpath,{torch_lib}"] if any(torch_lib.glob("libgomp*")) else []
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        partial = Path(folder) / target.name
        subprocess.run(
            [compiler, *_FLAGS, str(SOURCE), "-o", str(partial), *runtime],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(partial, target)  # atomic: processes that build at once each see a whole library


@functools.cache
def library() -> ctypes.CDLL | None:
    """Load the compiled ``row_kernels.c``, built on first use; ``None`` where it is switched off or cannot be built."""
    if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], check=True, capture_output=True, text=True, timeout=30)
        key = hashlib.sha256(
            "\0".join(
                [SOURCE.read_text(), version.stdout, *_FLAGS, _cpu_flags(), torch.__version__, torch.__file__]
            ).encode()
        ).hexdigest()[:16]
        folder = Path(platformdirs.user_cache_dir("anomalib-adfa")) / "native"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"row_kernels-{key}.so"
        if not target.exists():
            _compile(compiler, target)
        native = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or str(err)
        logger.warning(
            "Could not build ADFA's C row kernels with %r (%s); the compiled PyTorch kernels run instead, with the "
            "same scores, more slowly.",
            compiler,
            detail.strip().splitlines()[0] if detail.strip() else type(err).__name__,
        )
        return None
    pointer = ctypes.c_void_p
    native.adfa_weight_sums.restype = None
    native.adfa_weight_sums.argtypes = [
        *(pointer, ctypes.c_int64, ctypes.c_int64, pointer, pointer, pointer),
        *(ctypes.c_float, pointer, pointer, ctypes.c_int),
    ]
    native.adfa_row_extremes.restype = None
    native.adfa_row_extremes.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64, pointer, pointer, ctypes.c_int]
    return native


def _ready(distances: torch.Tensor, *others: torch.Tensor) -> ctypes.CDLL | None:
    """Return the library if it is built and the tensors are float32 CPU ones without autograd, distances 2-D."""
    tensors = (distances, *others)
    if distances.dim() != 2 or not all(
        tensor.dtype == torch.float32 and tensor.device.type == "cpu" and not tensor.requires_grad for tensor in tensors
    ):
        return None
    return library()


def _row_values(column: torch.Tensor, rows: int) -> torch.Tensor:
    """Return a per-row ``(R, 1)`` (or ``(1, 1)``) column as a contiguous ``(R,)`` vector."""
    return column.expand(rows, 1).reshape(rows).contiguous()


def row_sums(
    distances: torch.Tensor,
    beta: torch.Tensor,
    slope: torch.Tensor,
    shift: torch.Tensor,
    zero: float = 0.0,
    gradient: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Row sums ``(R, 4)`` in C; with a ``gradient`` buffer ``(R, N)``, also the gradient written into it.

    The same call serves :data:`~anomalib_adfa.chunk_kernels.weight_sums` (without the last two arguments) and
    :data:`~anomalib_adfa.chunk_kernels.sums_and_gradient`, with the same formulas.

    Args:
        distances: Raw distances ``(R, N)``.
        beta: Thresholds ``(R, 1)``.
        slope: Slopes ``(R, 1)``.
        shift: Shifts ``(R, 1)``.
        zero: As in :data:`~anomalib_adfa.chunk_kernels.sums_and_gradient`.
        gradient: ``(R, N)`` buffer for the gradient, or ``None`` for the sums alone.

    Returns:
        The sums, or ``None`` where the C kernels do not run (not built, not float32 CPU tensors, or a gradient
        buffer that is not contiguous): the caller then runs its PyTorch kernel.
    """
    extra = () if gradient is None else (gradient,)
    native = _ready(distances, beta, slope, shift, *extra)
    if native is None or (gradient is not None and not gradient.is_contiguous()):
        return None
    distances = distances.contiguous()
    rows, columns = distances.shape
    beta, slope, shift = (_row_values(column, rows) for column in (beta, slope, shift))
    sums = distances.new_empty((rows, 4))
    native.adfa_weight_sums(
        *(distances.data_ptr(), rows, columns, beta.data_ptr(), slope.data_ptr(), shift.data_ptr()),
        *(zero, sums.data_ptr(), None if gradient is None else gradient.data_ptr(), torch.get_num_threads()),
    )
    return sums


def row_extremes(distances: torch.Tensor, shift: torch.Tensor) -> torch.Tensor | None:
    """Extremes and moments ``(R, 6)`` of :data:`~anomalib_adfa.chunk_kernels.row_extremes`, or ``None`` (as above)."""
    native = _ready(distances, shift)
    if native is None or distances.numel() == 0:  # PyTorch's reductions give their own error on empty rows
        return None
    distances = distances.contiguous()
    rows, columns = distances.shape
    extremes = distances.new_empty((rows, 6))
    shift = _row_values(shift, rows)
    native.adfa_row_extremes(
        distances.data_ptr(), rows, columns, shift.data_ptr(), extremes.data_ptr(), torch.get_num_threads()
    )
    return extremes
