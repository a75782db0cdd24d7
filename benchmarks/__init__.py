"""Side-by-side benchmark of ADFA and anomalib's feature-based models on the ADFA paper's medical datasets.

Run ``python -m benchmarks.run --help``; see ``docs/benchmark.md`` for the method and the committed results.
"""
