"""ADFA as an anomalib model: Attention-augmented Differentiable top-k Feature Adaptation.

Method: Huang, Liu, Luo, Yang, "ADFA: Attention-Augmented Differentiable Top-k Feature Adaptation for
Unsupervised Medical Anomaly Detection" (public code: ``cbmi-group/ADFA``). The soft top-k operator follows
Xie et al., "Differentiable Top-k with Optimal Transport", NeurIPS 2020 (:mod:`anomalib_adfa.scoring.soft_topk`).

This module is the thin Lightning side: it builds :class:`~anomalib_adfa.torch_model.AdfaModel`, fixes its
centre bank before the first step (:mod:`~anomalib_adfa.centers`), serves the frozen features from the cache
(:mod:`~anomalib_adfa.feature_cache`), and calls ``AdfaModel.forward`` in every step (the loss is
:class:`~anomalib_adfa.loss.AdfaLoss` of its patch scores). Checkpoint checks are in
:mod:`~anomalib_adfa.deploy.checkpoint`, the export methods in :mod:`~anomalib_adfa.deploy.export`.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_adfa import Adfa
    >>> from anomalib_adfa.data import BrainMRI
    >>> engine = Engine(max_epochs=200)  # doctest: +SKIP
    >>> engine.fit(Adfa(), datamodule=BrainMRI(root="~/data/brain_tumor_dataset"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_adfa.backbones import stage_layers
from anomalib_adfa.centers import mean_training_descriptor
from anomalib_adfa.deploy.checkpoint import CONFIGURATION_KEY, accept_checkpoint, effective_configuration
from anomalib_adfa.deploy.export import AdfaExport
from anomalib_adfa.descriptor import PUBLIC_ATTENTION_KERNEL
from anomalib_adfa.evaluation.metrics import clinical_test_metrics
from anomalib_adfa.evaluation.pixel_metrics import LocalisationEvaluator, pixel_test_metrics
from anomalib_adfa.evaluation.post_processing import SpecificityPostProcessor
from anomalib_adfa.feature_cache import (
    FeatureCache,
    cached_features,
    feature_fingerprint,
    keep_ddp_shards,
    training_augmentations,
)
from anomalib_adfa.loss import AdfaLoss
from anomalib_adfa.mask_frame import MaskResolution, default_pre_processor
from anomalib_adfa.report.visualization import MedicalImageVisualizer
from anomalib_adfa.scoring import Backend, DistanceMode, TopKMode
from anomalib_adfa.torch_model import AdfaModel

logger = logging.getLogger(__name__)


class Adfa(AdfaExport, AnomalibModule):
    """ADFA: frozen CNN features adapted towards per-position centres with a soft top-k loss.

    Args:
        backbone: timm name of the frozen backbone.
        layers: Backbone layers to concatenate (largest map first); ``None`` (default): the backbone's
            stride-4/8/16 stages (layer1-3 for WR50, ``blocks.1/2/4`` for EfficientNet-Lite0).
        pre_trained: Use ImageNet weights (``backbone_weights`` if given, else timm's hub).
        backbone_weights: Local weights file for the backbone, for offline machines, or ``"packaged"``: the ImageNet
            weights of the ``lite0`` extra (``tf_efficientnet_lite0`` only).
        gamma_d: Channel reduction of the descriptor, ``D' = D // gamma_d``.
        attention_eps: Weight of the channel attention branch (``0`` disables it).
        attention_kernel: Kernel of the attention conv: ``9`` (public code) or ``"eca"`` (paper).
        num_nearest: ``K`` of the soft top-k.
        topk_mode: ``"reference"`` (published operator), ``"sharp"`` or ``"hard"``.
        ot_epsilon: Entropic regularisation of the soft top-k.
        distance: ``"kl_weighted"`` (public code), ``"squared"`` or ``"euclidean"`` (paper Eq. 4).
        score_sqrt: Square root of patch scores in the anomaly map (public code).
        sigma: Gaussian blur of the anomaly map in pixels.
        backend: Scoring backend: ``"auto"`` (fused on a CPU, plain on other devices), ``"plain"`` (full distance
            tensor, the natural path on a GPU) or ``"fused"`` (chunked). A run-time choice with the same scores:
            checkpoints do not record it.
        input_normalization: ``"imagenet"``, ``"half"`` (mean = std = 0.5) or ``None`` for the
            backbone's own normalisation. Used only by the default pre-processor.
        image_size: Resize size of the default pre-processor.
        center_crop_size: Centre crop of the default pre-processor (``None``: no crop).
        mask_resolution: Where the default pre-processor has maps meet masks: ``"input"`` (after resize and
            crop, anomalib's convention) or ``"original"`` (the image's frame; lesion parts outside the crop count
            as missed). See :mod:`anomalib_adfa.mask_frame`.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        cache_features: Reuse frozen-backbone features of training images across epochs.
        cache_max_bytes: Memory budget of the feature cache.
        pre_processor: Pre-processor, or ``True`` for the default one.
        post_processor: Post-processor, or ``True`` for :class:`SpecificityPostProcessor` (threshold at 95 %
            specificity on the validation normals).
        evaluator: Evaluator, or ``True`` for the default: image AUROC and F1, the clinical image metrics
            (:func:`~anomalib_adfa.evaluation.metrics.clinical_test_metrics`) and, where the test set has masks, pixel
            AUROC, AUPRO (FPR limit 0.3), Dice and IoU (see :meth:`configure_evaluator`).
        visualizer: Visualizer, or ``True`` for :class:`~anomalib_adfa.report.visualization.MedicalImageVisualizer`.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        gamma_d: int = 4,
        attention_eps: float = 0.1,
        attention_kernel: int | Literal["eca"] = PUBLIC_ATTENTION_KERNEL,
        num_nearest: int = 3,
        topk_mode: TopKMode = "reference",
        ot_epsilon: float = 0.1,
        distance: DistanceMode = "kl_weighted",
        score_sqrt: bool = True,
        sigma: float = 4.0,
        backend: Backend = "auto",
        input_normalization: Literal["imagenet", "half"] | None = None,
        image_size: tuple[int, int] = (256, 256),
        center_crop_size: tuple[int, int] | None = (224, 224),
        mask_resolution: MaskResolution = "input",
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        cache_features: bool = True,
        cache_max_bytes: int = 2 * 1024**3,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        # Resolved before anomalib saves the hyperparameters, so checkpoints name the layers that ran.
        if layers is None:
            layers = stage_layers(backbone)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(
                image_size=image_size,
                center_crop_size=center_crop_size,
                normalization=input_normalization or backbone,
                mask_resolution=mask_resolution,
            )
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = AdfaModel(
            backbone=backbone,
            layers=tuple(layers),
            pre_trained=pre_trained,
            backbone_weights=backbone_weights,
            gamma_d=gamma_d,
            attention_eps=attention_eps,
            attention_kernel=attention_kernel,
            num_nearest=num_nearest,
            topk_mode=topk_mode,
            ot_epsilon=ot_epsilon,
            distance=distance,
            score_sqrt=score_sqrt,
            sigma=sigma,
            backend=backend,
        )
        self.loss = AdfaLoss()
        self.lr = lr
        self.weight_decay = weight_decay
        self.feature_cache = FeatureCache(max_bytes=cache_max_bytes) if cache_features else None

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        center_crop_size: tuple[int, int] | None = (224, 224),
        normalization: str = "imagenet",
        mask_resolution: MaskResolution = "input",
    ) -> PreProcessor:
        """Resize, centre-crop and normalise as the public ADFA code does (:func:`.default_pre_processor`)."""
        return default_pre_processor(image_size, center_crop_size, normalization, mask_resolution)

    @classmethod
    def configure_visualizer(cls) -> Visualizer:
        """Use anomalib's image visualiser with the project's reader, so DICOM and 16-bit inputs draw.

        anomalib's own re-opens every input with PIL, which cannot read DICOM (see
        :class:`~anomalib_adfa.report.visualization.MedicalImageVisualizer`).
        """
        return MedicalImageVisualizer()

    def configure_post_processor(self) -> PostProcessor:
        """Threshold at 95 % specificity on validation normals; order-preserving normalisation (printed AUROC = raw)."""
        return SpecificityPostProcessor()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Clinical image metrics (:func:`.clinical_test_metrics`) and pixel metrics (:mod:`.pixel_metrics`).

        The pixel metrics (``pixel_AUROC``, ``pixel_AUPRO@fpr0.3``, ``pixel_Dice@<threshold source>``,
        ``pixel_IoU@<threshold source>``) are computed only when the test batches carry masks; they replace the
        pixel AUROC and F1 of the clinical set (pixel F1 is Dice).
        """
        image_metrics = [metric for metric in clinical_test_metrics() if not metric.name.startswith("pixel_")]
        return LocalisationEvaluator(test_metrics=[*image_metrics, *pixel_test_metrics()])

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        """Fix the centre bank from the training images before the first step (unless loaded).

        Also prepares the feature cache for this run's features and resets the reference of ``train_loss_rel``
        (the progress bar's loss: the epoch's mean loss over the loss of this run's first training step).
        """
        self._first_loss: torch.Tensor | None = None
        if self.feature_cache is not None:
            fingerprint = feature_fingerprint(self.hparams, self._transform)
            self.feature_cache.prepare(training_augmentations(self.trainer), fingerprint)
        if not self.model.has_centers:
            centers = mean_training_descriptor(
                lambda images, paths: self.model.describe(self._features(self._preprocess(images), paths)),
                self.trainer.train_dataloader,
                self.trainer.strategy,
                self.device,
            )
            self.model.set_centers(centers)

    @property
    def _transform(self) -> Any:
        return self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the pre-processor's transform exactly as anomalib does in its batch hooks."""
        return self._transform(images) if self._transform is not None else images

    def _features(self, images: torch.Tensor, paths: Sequence[str] | None) -> list[torch.Tensor]:
        return cached_features(self.feature_cache, self.model.extract_features, images, paths)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One optimisation step on the frozen (possibly cached) features of a pre-processed batch."""
        features = self._features(batch.image, getattr(batch, "image_path", None))
        loss = self.loss(self.model(batch.image, features))
        if getattr(self, "_first_loss", None) is None:
            self._first_loss = loss.detach().abs().clamp_min(torch.finfo(loss.dtype).tiny)
        logged = {"batch_size": batch.image.shape[0], "on_step": False, "on_epoch": True, "sync_dist": True}
        self.log("train_loss", loss, **logged)
        # The raw loss (a mean weighted patch distance) runs to 1e5 and says little; the bar shows it relative.
        self.log("train_loss_rel", loss.detach() / self._first_loss, prog_bar=True, **logged)
        return {"loss": loss}

    def on_train_epoch_start(self) -> None:
        """Under DDP with the feature cache, keep each rank on its own shard (see :func:`.keep_ddp_shards`)."""
        keep_ddp_shards(self.feature_cache, self.trainer.train_dataloader)

    def on_train_epoch_end(self) -> None:
        """Report how much of the epoch was served by the feature cache."""
        if self.feature_cache is not None:
            self.log("feature_cache_hit_rate", self.feature_cache.hit_rate, on_epoch=True, sync_dist=True)
            self.feature_cache.reset_counters()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a pre-processed validation batch: the batch updated with ``pred_score`` and ``anomaly_map``."""
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with AMSGrad on the descriptor, as in the paper."""
        return torch.optim.AdamW(
            self.model.descriptor.parameters(),
            lr=self.lr,
            weight_decay=self.weight_decay,
            amsgrad=True,
        )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the effective configuration, which :func:`.check_compatibility` reads."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CONFIGURATION_KEY] = effective_configuration(self.hparams)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with another configuration; score it with this model's scoring settings.

        Runs for ``test``, ``validate``, ``predict`` and ``fit`` with ``ckpt_path`` and for
        :func:`~anomalib_adfa.deploy.export.export_checkpoint`. The blur kernel is a buffer derived from ``sigma``: the
        checkpoint's copy is replaced by this model's, so a requested ``sigma`` takes effect instead of the
        checkpoint's (the difference is logged by the check).
        """
        kernel = self.model.anomaly_map_generator.blur.kernel
        accept_checkpoint(self.hparams, checkpoint, {"model.anomaly_map_generator.blur.kernel": kernel})
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ anomalib hooks
    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping; no sanity validation (the centres do not exist before training)."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """ADFA learns from normal images only."""
        return LearningType.ONE_CLASS
