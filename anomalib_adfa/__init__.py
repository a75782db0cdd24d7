"""ADFA (Attention-augmented Differentiable top-k Feature Adaptation) for anomalib.

Importing this package registers :class:`Adfa` as an :class:`~anomalib.models.AnomalibModule`
subclass, so ``anomalib train --model Adfa`` and ``anomalib.models.get_model("adfa")`` find it.
"""

from anomalib_adfa.lightning_model import Adfa
from anomalib_adfa.post_processing import RankPreservingPostProcessor, SpecificityPostProcessor
from anomalib_adfa.torch_model import AdfaModel

__all__ = ["Adfa", "AdfaModel", "RankPreservingPostProcessor", "SpecificityPostProcessor"]
__version__ = "0.1.0"
