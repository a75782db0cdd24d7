"""The ADFA torch model: dimensions, centre bank, the one forward of training and inference."""

import pytest
import torch
from anomalib.data import InferenceBatch

from anomalib_adfa.scoring import TOPK_MODES
from anomalib_adfa.scoring.plain import plain_scores
from anomalib_adfa.torch_model import AdfaModel, CentersNotInitializedError

LITE0 = {"backbone": "tf_efficientnet_lite0", "pre_trained": False}


def test_wide_resnet_dimensions_match_the_paper() -> None:
    model = AdfaModel(pre_trained=False)
    features = model.extract_features(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14)]
    descriptors = model.describe(features)
    assert descriptors.shape == (1, 448, 56, 56)
    assert model.descriptor.projection.in_channels == 1792 + 2


def test_scores_need_a_centre_bank_of_the_right_shape() -> None:
    model = AdfaModel(**LITE0).eval()
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(CentersNotInitializedError, match="train the model"):
        model(images)
    with pytest.raises(ValueError, match="centre bank must have shape"):
        model.set_centers(torch.zeros(256, 7))
    model.set_centers(torch.zeros(100, model.descriptor_channels))
    with pytest.raises(ValueError, match="input size the model was trained with"):
        model(images)


@pytest.mark.parametrize("mode", ["reference", "sharp", "hard"])
def test_eval_forward_returns_an_inference_batch(mode: str) -> None:
    torch.manual_seed(0)
    # float64: the backbone's float32 convolutions round differently for different batch sizes.
    model = AdfaModel(**LITE0, topk_mode=mode).eval().double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    descriptors = model.describe(model.extract_features(images))
    model.set_centers(descriptors.mean(0).flatten(1).T)
    output = model(images)
    assert isinstance(output, InferenceBatch)
    assert output.anomaly_map.shape == (3, 1, 32, 32)
    torch.testing.assert_close(output.pred_score, output.anomaly_map.amax(dim=(1, 2, 3)))
    # Each image scores the same alone as in the batch.
    alone = torch.cat([model(image[None]).pred_score for image in images])
    torch.testing.assert_close(alone, output.pred_score, rtol=1e-6, atol=0)


def test_training_forward_returns_differentiable_patch_scores_and_keeps_backbone_frozen() -> None:
    model = AdfaModel(**LITE0)
    images = torch.randn(2, 3, 64, 64)
    model.set_centers(model.describe(model.extract_features(images)).mean(0).flatten(1).T)
    model.train()
    assert not model.feature_extractor.training
    scores = model(images)
    assert scores.shape == (2, 16 * 16)
    scores.mean().backward()
    assert model.descriptor.projection.weight.grad is not None
    assert all(p.grad is None for p in model.feature_extractor.parameters())


def test_same_seed_same_model() -> None:
    images = torch.randn(1, 3, 64, 64)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = AdfaModel(**LITE0)
        outputs.append(model.describe(model.extract_features(images)))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "plain"])
@pytest.mark.parametrize("mode", TOPK_MODES)
def test_model_patch_scores_use_the_exact_loss(mode: str, backend: str) -> None:
    torch.manual_seed(1)
    model = AdfaModel(**LITE0, topk_mode=mode, backend=backend).double()
    assert model.scorer.backend == backend  # "auto": the fused backend on this CPU
    features = model.extract_features(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    with torch.no_grad():
        model.set_centers(model.describe(features).mean(dim=0).flatten(1).T)
    descriptors = model.describe(features)
    patches = descriptors.flatten(2).transpose(1, 2)
    expected = plain_scores(patches, model.centers, "kl_weighted", model.scorer.topk).mean()
    loss = model.patch_scores(descriptors).mean()
    parameters = list(model.descriptor.parameters())
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    grads = torch.autograd.grad(loss, parameters, retain_graph=True)  # the two losses share the descriptor graph
    for ours, reference in zip(grads, torch.autograd.grad(expected, parameters), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-7, atol=1e-9)
