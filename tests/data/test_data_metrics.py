"""The image_AUROC anomalib prints equals the AUROC of the raw test scores.

anomalib 2.7's default post-processor clamps normalised scores (ties); without normalisation,
torchmetrics' sigmoid saturates unbounded scores (ties). With :class:`RankPreservingPostProcessor`
(or ADFA's :class:`SpecificityPostProcessor`, which normalises the same way) the printed value is the
raw AUROC under the paper's ``same_as_test`` validation and the label-free ``from_train`` default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.engine import Engine
from anomalib.metrics import AUROC
from anomalib.models import Padim
from anomalib.post_processing import PostProcessor
from lightning.pytorch import Callback, LightningModule, Trainer
from sklearn.metrics import roc_auc_score

from anomalib_adfa import RankPreservingPostProcessor, SpecificityPostProcessor
from anomalib_adfa.data import BrainMRI

# Raw scores whose F1 threshold (0.3) sits near the bottom of their range: anomalib's
# clamp((s - t) / (max - min) + 0.5) maps the normal 9.0 and the abnormal 6.0 and 8.0 all to 1.
RAW_SCORES = torch.tensor([0.1, 0.2, 9.0, 0.25, 0.3, 6.0, 8.0, 10.0])
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def printed_auroc(post_processor: PostProcessor, scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fit a post-processor on (scores, labels) as validation, then compute anomalib's image_AUROC on them."""
    batch = ImageBatch(image=torch.zeros(len(scores), 3, 4, 4), gt_label=labels, pred_score=scores.clone())
    post_processor.on_validation_batch_end(None, None, batch)
    post_processor.on_validation_epoch_end(None, None)
    test_batch = ImageBatch(image=batch.image, gt_label=labels, pred_score=scores.clone())
    post_processor.on_test_batch_end(None, None, test_batch)
    metric = AUROC(fields=["pred_score", "gt_label"])
    metric.update(test_batch)
    return float(metric.compute())


def test_anomalib_default_post_processor_ties_scores() -> None:
    """Why the datamodules recommend RankPreservingPostProcessor: anomalib's clamp changes the AUROC."""
    raw = roc_auc_score(LABELS.numpy(), RAW_SCORES.numpy())
    assert printed_auroc(PostProcessor(), RAW_SCORES, LABELS) != pytest.approx(raw, abs=1e-3)


def test_rank_preserving_post_processor_keeps_the_raw_auroc_and_labels() -> None:
    post_processor = RankPreservingPostProcessor()
    raw = roc_auc_score(LABELS.numpy(), RAW_SCORES.numpy())
    assert printed_auroc(post_processor, RAW_SCORES, LABELS) == pytest.approx(raw, abs=1e-6)
    normalised = post_processor(ImageBatch(image=torch.zeros(8, 3, 4, 4), pred_score=RAW_SCORES.clone()))
    assert torch.all((normalised.pred_score > 0) & (normalised.pred_score < 1))
    assert torch.equal(normalised.pred_label, RAW_SCORES.gt(post_processor.image_threshold))


class RawScores(Callback):
    """Record test scores before the model's post-processor normalises them in place.

    Callbacks passed to the Engine run before the model's own (post-processor, evaluator).
    """

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: ImageBatch,
        batch: ImageBatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        del trainer, pl_module, batch, batch_idx, dataloader_idx
        self.scores.append(outputs.pred_score.detach().flatten().clone())
        self.labels.append(outputs.gt_label.flatten().clone())


@pytest.mark.parametrize(
    ("val_split_mode", "post_processor"),
    [("same_as_test", RankPreservingPostProcessor), ("from_train", SpecificityPostProcessor)],
)
def test_engine_prints_the_raw_auroc(
    brainmri_root: Path, tmp_path: Path, val_split_mode: str, post_processor: type[PostProcessor]
) -> None:
    torch.manual_seed(0)
    datamodule = BrainMRI(root=brainmri_root, eval_batch_size=64, val_split_mode=val_split_mode)
    model = Padim(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer1", "layer2"],
        pre_processor=Padim.configure_pre_processor(image_size=(64, 64)),
        post_processor=post_processor(),
        visualizer=False,
    )
    recorder = RawScores()
    engine = Engine(callbacks=[recorder], logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    (results,) = engine.test(model=model, datamodule=datamodule, verbose=False)

    labels = torch.cat(recorder.labels).numpy()
    scores = torch.cat(recorder.scores).numpy()
    assert len(scores) == 195  # the test split is exactly Table 2's
    assert sorted(labels.tolist()) == [0] * 40 + [1] * 155
    raw_auroc = roc_auc_score(labels, scores)
    assert 0.5 < raw_auroc < 1.0  # a real, non-degenerate ranking
    assert results["image_AUROC"] == pytest.approx(raw_auroc, abs=1e-6)
