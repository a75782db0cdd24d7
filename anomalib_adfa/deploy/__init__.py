"""Deployment: exporting ADFA, checking checkpoints, and scoring images with an exported model.

- :mod:`~anomalib_adfa.deploy.export`: ADFA's ``to_torch``/``to_onnx``/``to_openvino`` (:class:`AdfaExport`:
  opset 18, float32 OpenVINO IR, a fresh folder per export), :func:`export_checkpoint` (export a checkpoint as the
  requested model, into its run folder) and the ``anomalib export`` routing the start-up hook installs.
- :mod:`~anomalib_adfa.deploy.checkpoint`: whether a checkpoint may be loaded into a model of a requested
  configuration (:func:`check_compatibility`, :class:`IncompatibleCheckpointError`).
- :mod:`~anomalib_adfa.deploy.predict`: ``anomalib-adfa predict``, exported models (OpenVINO or ONNX) on DICOM and
  PNG files without the training stack (:class:`ExportedModel`, :func:`predict`).

Import the modules themselves; this package imports nothing, so the command line stays light.
"""
