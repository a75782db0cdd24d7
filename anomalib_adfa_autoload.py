"""Make ``anomalib`` see ADFA without an explicit import.

anomalib has no plugin entry point: its CLI resolves ``--model Adfa`` or ``--data BrainMRI``
only among classes that are already imported. The one-line ``anomalib_adfa_autoload.pth``
installed next to this module calls :func:`install` at interpreter start-up. That adds a
finder which does nothing until ``anomalib.models`` is imported, then imports
``anomalib_adfa.lightning_model`` (which defines :class:`~anomalib_adfa.Adfa`; the package
itself imports it lazily) and ``anomalib_adfa.data`` right after it, and removes itself.
Processes that never import anomalib pay only for reading this file.

When ``anomalib.models`` is first imported from inside an ``anomalib_adfa`` module (say
``import anomalib_adfa.torch_model``), the plugin modules would import that half-initialised
module back; the finder then waits until the outermost ``anomalib_adfa`` module has finished
and imports them then.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

TRIGGER = "anomalib.models"
PACKAGE = "anomalib_adfa"
PLUGIN_MODULES = ("anomalib_adfa.lightning_model", "anomalib_adfa.data")


class _ImportAfterLoader(importlib.abc.Loader):
    """Run the real loader of a watched module, then import the plugin modules once that is safe."""

    def __init__(self, inner: importlib.abc.Loader, finder: _AnomalibModelsFinder, trigger: bool) -> None:
        self.inner = inner
        self.finder = finder
        self.trigger = trigger

    def __getattr__(self, name: str):
        # Everything else (get_code for ``python -m``, get_source, resource readers) is the real loader's.
        return getattr(self.inner, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Give the module its real loader back before anything else can look at it.
        module.__spec__.loader = self.inner
        module.__loader__ = self.inner
        finder = self.finder
        if self.trigger:
            self.inner.exec_module(module)
            finder.triggered = True
        else:
            finder.depth += 1
            try:
                self.inner.exec_module(module)
            finally:
                finder.depth -= 1
        if finder.triggered and finder.depth == 0:
            finder.finish()


class _AnomalibModelsFinder(importlib.abc.MetaPathFinder):
    """Finder that watches ``anomalib.models`` and, until the plugin is imported, the plugin's own modules."""

    def __init__(self) -> None:
        self.depth = 0  # anomalib_adfa modules being executed right now
        self.triggered = False

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRIGGER and fullname.partition(".")[0] != PACKAGE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return spec
        spec.loader = _ImportAfterLoader(spec.loader, self, trigger=fullname == TRIGGER)
        return spec

    def finish(self) -> None:
        """Stop watching and import the plugin modules."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for name in PLUGIN_MODULES:
            importlib.import_module(name)


def install() -> None:
    """Register the finder once (``.pth`` files may be processed more than once)."""
    if TRIGGER in sys.modules:
        for name in PLUGIN_MODULES:
            importlib.import_module(name)
        return
    if not any(isinstance(finder, _AnomalibModelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsFinder())
