"""Evaluation: metrics, operating points and the post-processors that set them.

- :mod:`~anomalib_adfa.evaluation.metrics`: the clinical image metrics (sensitivity, specificity, PPV, NPV, ...)
  and :func:`exact_auroc`, the package's one AUROC of raw scores.
- :mod:`~anomalib_adfa.evaluation.pixel_metrics`: pixel AUROC, AUPRO, Dice and IoU with bootstrap intervals, and
  the evaluator that computes them when test batches carry masks.
- :mod:`~anomalib_adfa.evaluation.post_processing`: rank-preserving normalisation and the threshold at a target
  specificity on validation normals (:class:`SpecificityPostProcessor`, ADFA's default).
- :mod:`~anomalib_adfa.evaluation.conformal`: the conformal rank of that threshold and exact binomial intervals.
- :mod:`~anomalib_adfa.evaluation.crossfit`: cross-fitted operating points (:class:`CrossFitThreshold`).
- :mod:`~anomalib_adfa.evaluation.operating_point`: the evaluator that leads ``anomalib test`` with the decision.

The Lightning callbacks users name on the command line are in :mod:`anomalib_adfa.callbacks`.
"""
