"""Which DICOM transfer syntaxes the reader decodes, with and without the pylibjpeg plugins of the ``dicom`` extra.

Every bundled pydicom test file with pixel data is read with :func:`anomalib_adfa.data.image.load_image`, once
with all installed decoders and once in a process where the pylibjpeg plugins cannot be imported (pydicom
alone, with Pillow and numpy). Prints a markdown table: per transfer syntax, files read / files tried.
Files that fail in both runs are damaged on purpose (pydicom's tests of bad input) and are listed.

Usage::

    python benchmarks/dicom_decoders.py
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import warnings
from collections import defaultdict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PLUGINS = ("pylibjpeg", "libjpeg", "openjpeg", "rle")
PACKAGES = ("pydicom", "pillow", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle")


def survey(block_plugins: bool) -> dict[str, dict[str, bool]]:
    """Read every bundled file; ``{transfer syntax name: {file: read}}``."""
    if block_plugins:
        for name in PLUGINS:
            sys.modules[name] = None  # type: ignore[assignment]
    warnings.simplefilter("ignore")
    import pydicom
    import pydicom.data

    from anomalib_adfa.data import CorruptImageError, ReadOptions, load_image

    results: dict[str, dict[str, bool]] = defaultdict(dict)
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = header.file_meta.TransferSyntaxUID
            frames = int(header.get("NumberOfFrames", 1) or 1)
            has_pixels = "PixelData" in pydicom.dcmread(path)
        except Exception:
            continue
        if not has_pixels:
            continue
        try:
            load_image(path, ReadOptions(frame=0 if frames > 1 else None))
            ok = True
        except CorruptImageError:
            ok = False
        results[f"{syntax.name} ({syntax})"][path.name] = ok
    return results


def _installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    """Run both surveys and print the table."""
    if len(sys.argv) > 1 and sys.argv[1] == "--survey":
        print(json.dumps(survey(block_plugins=sys.argv[2] == "blocked")))
        return
    runs = {}
    for mode in ("all", "blocked"):
        result = subprocess.run(
            [sys.executable, __file__, "--survey", mode], capture_output=True, text=True, check=True
        )
        runs[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d}; python {platform.python_version()}; {platform.platform()}")
    print("; ".join(f"{package} {_installed(package)}" for package in PACKAGES))
    print("command: python benchmarks/dicom_decoders.py\n")
    print("| transfer syntax | with the dicom extra | pydicom + Pillow only |")
    print("|---|---|---|")
    broken = []
    for syntax in sorted(runs["all"]):
        files = runs["all"][syntax]
        alone = runs["blocked"].get(syntax, {})
        print(f"| {syntax} | {sum(files.values())}/{len(files)} | {sum(alone.values())}/{len(alone)} |")
        broken += [name for name, ok in files.items() if not ok]
    print(f"\nunreadable with every decoder (damaged test files): {', '.join(sorted(broken)) or 'none'}")


if __name__ == "__main__":
    main()
