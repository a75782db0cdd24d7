"""ADFA (Attention-augmented Differentiable top-k Feature Adaptation) for anomalib.

The classes load on first access (``from anomalib_adfa import Adfa``), so that light modules such as
:mod:`anomalib_adfa.predict` (exported models) and the image reader do not pull in Lightning and the
training stack. Importing :class:`Adfa` registers it as an :class:`~anomalib.models.AnomalibModule`
subclass, so ``anomalib train --model Adfa`` and ``anomalib.models.get_model("adfa")`` find it; the
installed autoload hook (``anomalib_adfa_autoload``) does that as soon as ``anomalib.models`` is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalib_adfa.lightning_model import Adfa
    from anomalib_adfa.post_processing import RankPreservingPostProcessor
    from anomalib_adfa.torch_model import AdfaModel

_HOMES = {
    "Adfa": "anomalib_adfa.lightning_model",
    "AdfaModel": "anomalib_adfa.torch_model",
    "RankPreservingPostProcessor": "anomalib_adfa.post_processing",
}

__all__ = ["Adfa", "AdfaModel", "RankPreservingPostProcessor"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public class from its module on first access (PEP 562)."""
    if name not in _HOMES:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
