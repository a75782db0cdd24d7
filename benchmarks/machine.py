"""What a benchmark records about the machine it ran on."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def commit(repository: Path = REPOSITORY) -> str:
    """Short hash of the repository's checked-out commit, ``+`` if tracked code has changes, or ``unknown``.

    Untracked files and anything under ``benchmarks/results`` (results being written, a report rewritten by a run)
    do not count as changes to the code.
    """
    git = ["git", "-C", str(repository)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
