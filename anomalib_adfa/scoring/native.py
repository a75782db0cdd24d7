"""The soft top-k's row sums, gradient pass and row extremes in C++ (``row_kernels.cpp``), as PyTorch operators.

:data:`~anomalib_adfa.scoring.kernels.weight_sums`, :data:`~anomalib_adfa.scoring.kernels.sums_and_gradient` and
:data:`~anomalib_adfa.scoring.kernels.row_extremes` run here for float32 CPU chunks of eager runs. The file is
built the way PyTorch packages build native code, by :func:`torch.utils.cpp_extension.load` (ninja and the
system's C++ compiler, ``$CXX`` if set), once per machine, with ``-O3 -march=native`` and OpenMP, into PyTorch's
extension cache (``$TORCH_EXTENSIONS_DIR``) under a name that hashes the CPU's flags; it registers the operators
``torch.ops.anomalib_adfa.weight_sums`` and ``torch.ops.anomalib_adfa.row_extremes``. A compiler or ninja that is
missing or fails leaves the compiled PyTorch kernels in charge (one warning; same scores), and
``ANOMALIB_ADFA_NATIVE=0`` switches this off.

Why it stays: ``benchmarks/train_speed.py`` times the training step with these operators and with the
``torch.compile``'d kernels side by side; the ratio is in the model README ("Architecture").
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("row_kernels.cpp")

ENVIRONMENT_SWITCH = "ANOMALIB_ADFA_NATIVE"

FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp")


def _cpu_flags() -> str:
    """Return the CPU's feature flags (Linux), which ``-march=native`` compiles for, or the processor's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> None:
    """Build (or load from PyTorch's extension cache) ``row_kernels.cpp``, registering its operators."""
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    # Like Inductor's kernels: the OpenMP runtime that PyTorch loaded serves these parallel loops too.
    runtime = [f"-Wl,-rpath,{torch_lib}"] if any(torch_lib.glob("libgomp*")) else []
    key = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:12]
    cpp_extension.load(
        name=f"anomalib_adfa_row_kernels_{key}",
        sources=[str(SOURCE)],
        extra_cflags=list(FLAGS),
        extra_ldflags=["-fopenmp", *runtime],
        is_python_module=False,
        verbose=False,
    )


def registered() -> bool:
    """Whether this process already holds the operators (built and loaded once; a second load would fail)."""
    try:
        torch.ops.anomalib_adfa.weight_sums  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.cache
def library() -> object | None:
    """Return the operators' namespace ``torch.ops.anomalib_adfa``, built on first use; ``None`` where it cannot be."""
    if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return None
    try:
        if not registered():
            _build()
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        detail = str(err).strip()
        logger.warning(
            "Could not build ADFA's C++ row kernels with %r (%s); the compiled PyTorch kernels run instead, with "
            "the same scores, more slowly.",
            os.environ.get("CXX", "c++"),
            detail.splitlines()[0] if detail else type(err).__name__,
        )
        return None
    return torch.ops.anomalib_adfa


def _ready(distances: torch.Tensor, *others: torch.Tensor) -> object | None:
    """Return the operators if built and the tensors are float32 CPU ones without autograd, distances 2-D."""
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
    """Row sums ``(R, 4)`` in C++; with a ``gradient`` buffer ``(R, N)``, also the gradient written into it.

    The same call serves :data:`~anomalib_adfa.scoring.kernels.weight_sums` (without the last two arguments) and
    :data:`~anomalib_adfa.scoring.kernels.sums_and_gradient`, with the same formulas.

    Args:
        distances: Raw distances ``(R, N)``.
        beta: Thresholds ``(R, 1)``.
        slope: Slopes ``(R, 1)``.
        shift: Shifts ``(R, 1)``.
        zero: As in :data:`~anomalib_adfa.scoring.kernels.sums_and_gradient`.
        gradient: ``(R, N)`` buffer for the gradient, or ``None`` for the sums alone.

    Returns:
        The sums, or ``None`` where the C++ kernels do not run (not built, not float32 CPU tensors, or a gradient
        buffer that is not contiguous): the caller then runs its PyTorch kernel.
    """
    extra = () if gradient is None else (gradient,)
    native = _ready(distances, beta, slope, shift, *extra)
    if native is None or (gradient is not None and not gradient.is_contiguous()):
        return None
    rows = distances.shape[0]
    beta, slope, shift = (_row_values(column, rows) for column in (beta, slope, shift))
    return native.weight_sums(distances.contiguous(), beta, slope, shift, zero, gradient)


def row_extremes(distances: torch.Tensor, shift: torch.Tensor) -> torch.Tensor | None:
    """Extremes and moments ``(R, 6)`` of :data:`~anomalib_adfa.scoring.kernels.row_extremes`, or ``None``."""
    native = _ready(distances, shift)
    if native is None or distances.numel() == 0:  # PyTorch's reductions give their own error on empty rows
        return None
    return native.row_extremes(distances.contiguous(), _row_values(shift, distances.shape[0]))
