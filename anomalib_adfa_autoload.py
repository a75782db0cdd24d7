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

Three more changes, each explicit here and limited to what the command line or a lookup needs:

- ``anomalib.models.get_model`` and ``anomalib.data.get_datamodule`` (used by ``anomalib
  benchmark``) find a configured ``class_path`` only as an attribute of ``anomalib.models`` /
  ``anomalib.data``; ``Adfa`` and the plugin's datamodules (``BrainMRI``, ``Covid``, ...) are added
  there by name, never replacing one of anomalib's.
- In the ``anomalib`` command line (the process that imports ``anomalib.cli.cli``), once that
  module has installed its traceback display, the plugin's input errors (bad data, options,
  weights) are shown as their one message (:func:`anomalib_adfa.errors.install_cli_excepthook`),
  and two deprecation warnings of anomalib's own imports (timm's moved layers, anomalib's DINOv2
  package) are hidden there.
- In the process of the ``anomalib`` script itself (not in Python that merely imports anomalib's CLI),
  ``anomalib export --model Adfa ... --ckpt_path ...`` loads the checkpoint
  into the requested model with ADFA's compatibility check and exports into the checkpoint's run folder
  (:func:`anomalib_adfa.deploy.export.route_cli_checkpoint_exports`, which wraps ``Engine.export`` for ADFA
  models with a checkpoint only). This is the one change to an anomalib class the plugin makes, and
  only here: importing ``anomalib_adfa`` or building :class:`~anomalib_adfa.Adfa` changes nothing of
  anomalib's; in Python, :func:`anomalib_adfa.deploy.export.export_checkpoint` is the explicit form.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from pathlib import Path
from types import ModuleType

TRIGGER = "anomalib.models"
CLI_MODULE = "anomalib.cli.cli"
CLI_SCRIPT = "anomalib"
"""Name of anomalib's command-line script (``sys.argv[0]`` of the process that runs it)."""
PACKAGE = "anomalib_adfa"
PLUGIN_MODULES = ("anomalib_adfa.lightning_model", "anomalib_adfa.data")
NAMESPACES = (
    ("anomalib.models", "anomalib_adfa", "AnomalibModule"),
    ("anomalib.data", "anomalib_adfa.data", "AnomalibDataModule"),
)
"""anomalib namespace, plugin module and base class of the names that ``get_model`` / ``get_datamodule`` look up."""
_CLI_IMPORT_WARNINGS = (
    r"Importing from timm\.models\.layers is deprecated",
    r"The anomalib\.models\.components\.dinov2",
)


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
        if module.__name__ == CLI_MODULE:
            # anomalib's own imports warn about deprecations inside anomalib and timm that a user cannot act on.
            for message in _CLI_IMPORT_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            self.inner.exec_module(module)
            from anomalib_adfa.deploy.export import route_cli_checkpoint_exports
            from anomalib_adfa.errors import install_cli_excepthook

            install_cli_excepthook()
            if Path(sys.argv[0]).name == CLI_SCRIPT:
                route_cli_checkpoint_exports()
            return
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
    """Finder that watches ``anomalib.models``, anomalib's CLI module and, until the plugin is imported, its own."""

    def __init__(self) -> None:
        self.depth = 0  # anomalib_adfa modules being executed right now
        self.triggered = False

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in {TRIGGER, CLI_MODULE} and fullname.partition(".")[0] != PACKAGE:
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
        _import_plugins()


def _import_plugins() -> None:
    """Import the plugin modules, and the classes ``anomalib_adfa.data`` loads lazily, which registers them."""
    for name in PLUGIN_MODULES:
        module = importlib.import_module(name)
        for attribute in getattr(module, "__all__", ()):
            getattr(module, attribute)
    _register_names()


def _register_names() -> None:
    """Make ``get_model({"class_path": "Adfa"})`` and ``get_datamodule({"class_path": "BrainMRI"})`` work.

    Both look a dictionary's ``class_path`` up as an attribute of ``anomalib.models`` / ``anomalib.data``; the
    plugin's model and datamodules are added there by name, never replacing one of anomalib's.
    """
    for namespace_name, plugin_name, base_name in NAMESPACES:
        namespace = importlib.import_module(namespace_name)
        plugin = importlib.import_module(plugin_name)
        base = getattr(namespace, base_name)
        for name in plugin.__all__:
            value = getattr(plugin, name)
            if isinstance(value, type) and issubclass(value, base) and not hasattr(namespace, name):
                setattr(namespace, name, value)


def install() -> None:
    """Register the finder once (``.pth`` files may be processed more than once)."""
    if TRIGGER in sys.modules:
        _import_plugins()
        return
    if not any(isinstance(finder, _AnomalibModelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsFinder())
