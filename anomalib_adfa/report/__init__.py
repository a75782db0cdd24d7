"""Pictures for people: heatmap overlays and the offline HTML report.

- :mod:`~anomalib_adfa.report.visualization`: :class:`MedicalImageVisualizer`, anomalib's overlays drawn over the
  image as the project's reader sees it (DICOM and 16-bit inputs too).
- :mod:`~anomalib_adfa.report.visual_report`: ``anomalib-adfa report``, one HTML page per run folder with ROC
  curves, operating points, and the cases each model found or missed.
"""
