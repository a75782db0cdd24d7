"""ADFA (Attention-augmented Differentiable top-k Feature Adaptation) for anomalib.

``anomalib train --model Adfa`` and ``anomalib.models.get_model("adfa")`` find :class:`Adfa` because the
``anomalib_adfa_autoload`` hook imports :mod:`anomalib_adfa.lightning_model` right after ``anomalib.models``.
The names below are imported on first use, so ``anomalib-adfa --help`` and the light submodules do not pay for
torch, Lightning and anomalib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalib_adfa.evaluation.post_processing import RankPreservingPostProcessor, SpecificityPostProcessor
    from anomalib_adfa.lightning_model import Adfa
    from anomalib_adfa.torch_model import AdfaModel

_LAZY = {
    "Adfa": "anomalib_adfa.lightning_model",
    "AdfaModel": "anomalib_adfa.torch_model",
    "RankPreservingPostProcessor": "anomalib_adfa.evaluation.post_processing",
    "SpecificityPostProcessor": "anomalib_adfa.evaluation.post_processing",
}

__all__ = ["Adfa", "AdfaModel", "RankPreservingPostProcessor", "SpecificityPostProcessor"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the public classes on first access."""
    if name not in _LAZY:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
