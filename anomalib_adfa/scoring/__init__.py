"""ADFA's patch scores: the exact soft top-k operator, the distances, and two backends that run them.

Read in this order:

- :mod:`~anomalib_adfa.scoring.soft_topk`: the operator (closed-form logistic threshold of the two-anchor
  entropic OT, its Newton solve, the autograd Function with the implicit backward, the derivation), with the
  one weight formula and the one gradient formula every backend uses;
- :mod:`~anomalib_adfa.scoring.logits`: from distances to logits per top-k mode, and the searches' starts;
- :mod:`~anomalib_adfa.scoring.distances`: the distance modes and their one-matmul operands;
- :mod:`~anomalib_adfa.scoring.scorer`: :class:`PatchScorer`, the module the model calls, which runs
- :mod:`~anomalib_adfa.scoring.plain` (full tensors, autograd; the natural path on a GPU) or
- :mod:`~anomalib_adfa.scoring.fused` (chunked, cache-sized, no ``(B, T, N)`` tensor; the CPU path), built
  from :mod:`~anomalib_adfa.scoring.chunking`, :mod:`~anomalib_adfa.scoring.memory`,
  :mod:`~anomalib_adfa.scoring.selection`, :mod:`~anomalib_adfa.scoring.kernels`,
  :mod:`~anomalib_adfa.scoring.search` and :mod:`~anomalib_adfa.scoring.modes`.
"""

from anomalib_adfa.scoring.distances import DISTANCE_MODES, DistanceMode, kl_weight
from anomalib_adfa.scoring.scorer import BACKENDS, Backend, PatchScorer
from anomalib_adfa.scoring.soft_topk import TOPK_MODES, TopKMode, TopKSettings

__all__ = [
    "BACKENDS",
    "DISTANCE_MODES",
    "TOPK_MODES",
    "Backend",
    "DistanceMode",
    "PatchScorer",
    "TopKMode",
    "TopKSettings",
    "kl_weight",
]
