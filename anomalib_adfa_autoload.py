"""Make ``anomalib`` see ADFA without an explicit import.

anomalib has no plugin entry point: its CLI resolves ``--model Adfa`` or ``--data BrainMRI``
only among classes that are already imported. The one-line ``anomalib_adfa_autoload.pth``
installed next to this module calls :func:`install` at interpreter start-up. That adds a
finder which does nothing until ``anomalib.models`` is imported, then imports
``anomalib_adfa`` and ``anomalib_adfa.data`` (and the classes they load lazily) right after it, and
removes itself. Processes
that never import anomalib pay only for reading this file.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

TRIGGER = "anomalib.models"
PLUGIN_MODULES = ("anomalib_adfa", "anomalib_adfa.data")


class _ImportAfterLoader(importlib.abc.Loader):
    """Run the real loader of the trigger module, then import the plugin modules."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Give the module its real loader back before anything else can look at it.
        module.__spec__.loader = self.inner
        module.__loader__ = self.inner
        self.inner.exec_module(module)
        _import_plugins()


class _AnomalibModelsFinder(importlib.abc.MetaPathFinder):
    """One-shot finder that wraps the loader of ``anomalib.models``."""

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ImportAfterLoader(spec.loader)
        return spec


def _import_plugins() -> None:
    """Import the plugin packages and every public class they load lazily, which registers them with anomalib."""
    for name in PLUGIN_MODULES:
        module = importlib.import_module(name)
        for attribute in getattr(module, "__all__", ()):
            getattr(module, attribute)


def install() -> None:
    """Register the finder once (``.pth`` files may be processed more than once)."""
    if TRIGGER in sys.modules:
        _import_plugins()
        return
    if not any(isinstance(finder, _AnomalibModelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsFinder())
