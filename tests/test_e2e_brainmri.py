"""End to end on real images: ADFA with ImageNet Lite0 features on the paper's BrainMRI split."""

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from sklearn.metrics import roc_auc_score

from anomalib_adfa import Adfa
from anomalib_adfa.data import BrainMRI
from anomalib_adfa.weights import efficientnet_lite0_weights

# Hard top-k learns on this split; the published (near-uniform) soft top-k does not (see the benchmark).
# 128 px keeps the test to about a minute of CPU.
EPOCHS = 10
# PaDiM with the same backbone and split reaches 0.76 here; chance is 0.5.
MIN_IMAGE_AUROC = 0.70


def raw_test_scores(model: Adfa, datamodule: BrainMRI) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores of the torch model before anomalib's normalisation, with their labels."""
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            scores.append(model.model(model.pre_processor.transform(batch.image)).pred_score)
            labels.append(batch.gt_label)
    return torch.cat(scores), torch.cat(labels)


@pytest.mark.slow
def test_adfa_detects_brain_tumours(brainmri_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(1024)
    datamodule = BrainMRI(root=brainmri_root, seed=1024, train_batch_size=10, eval_batch_size=10, num_workers=0)
    model = Adfa(
        backbone="tf_efficientnet_lite0",
        backbone_weights=efficientnet_lite0_weights(),
        topk_mode="hard",
        image_size=(146, 146),
        center_crop_size=(128, 128),
    )
    # No per-epoch validation: the AUROC below is computed once, from the raw scores.
    engine = Engine(
        max_epochs=EPOCHS,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    engine.fit(model, datamodule=datamodule)
    scores, labels = raw_test_scores(model, datamodule)
    assert labels.tolist().count(0) == 40
    assert labels.tolist().count(1) == 155
    auroc = roc_auc_score(labels.numpy(), scores.numpy())
    print(f"BrainMRI image AUROC (raw scores, hard top-k, 128 px, {EPOCHS} epochs): {auroc:.3f}")
    assert auroc >= MIN_IMAGE_AUROC
