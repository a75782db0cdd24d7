"""The clinical test metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from anomalib_adfa.evaluation.metrics import TEST_SPECIFICITIES, clinical_test_metrics, exact_auroc


def _sklearn(labels: np.ndarray, scores: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    tn, fp, fn, tp = confusion_matrix(labels, predicted).ravel()
    fpr, tpr, _ = roc_curve(labels, scores)
    expected = {
        "image_Sensitivity": tp / (tp + fn),
        "image_Specificity": tn / (tn + fp),
        "image_PPV": tp / (tp + fp),
        "image_NPV": tn / (tn + fn),
        "image_BalancedAccuracy": balanced_accuracy_score(labels, predicted),
        "image_AUPR": average_precision_score(labels, scores),
    }
    for level in TEST_SPECIFICITIES:
        expected[f"image_Sensitivity_at_Spec{round(100 * level)}"] = tpr[1 - fpr >= level - 1e-12].max()
    return expected


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", ["flat", "column"])
def test_metrics_match_scikit_learn(seed: int, shape: str) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = 1 / (1 + np.exp(-(rng.normal(size=300) + 1.2 * labels)))  # in (0, 1), as normalised scores are
    predicted = scores > 0.6
    view = (lambda array: array[:, None]) if shape == "column" else (lambda array: array)  # PaDiM gives (B, 1)
    batches = [
        ImageBatch(
            image=torch.zeros(len(part), 3, 2, 2),
            gt_label=torch.from_numpy(labels[part]),
            pred_score=torch.from_numpy(view(scores[part])).float(),
            pred_label=torch.from_numpy(view(predicted[part])),
        )
        for part in np.array_split(np.arange(300), 4)
    ]
    metrics = {metric.name: metric for metric in clinical_test_metrics() if metric.name.startswith("image_")}
    for metric in metrics.values():
        for batch in batches:
            metric.update(batch)
    for name, value in _sklearn(labels, scores.astype(np.float32), predicted).items():
        assert float(metrics[name].compute()) == pytest.approx(value, abs=1e-5), name


def test_balanced_accuracy_of_a_constant_prediction_is_one_half() -> None:
    metric = next(m for m in clinical_test_metrics() if m.name == "image_BalancedAccuracy")
    metric.update(
        ImageBatch(
            image=torch.zeros(4, 3, 2, 2),
            gt_label=torch.tensor([0, 0, 1, 1]),
            pred_label=torch.ones(4, dtype=torch.bool),
        )
    )
    assert float(metric.compute()) == 0.5


def test_metric_names_are_distinct() -> None:
    names = [metric.name for metric in clinical_test_metrics()]
    assert len(names) == len(set(names))
    assert "image_Sensitivity_at_Spec95" in names


def test_exact_auroc_is_the_raw_scores_auroc_without_sigmoid_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = 1e4 + 100 * rng.normal(size=200) + 50 * labels  # a sigmoid would map all of these to 1.0
    scores[:20] = scores[20:40]  # ties count one half
    expected = roc_auc_score(labels, scores)
    assert exact_auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(expected, abs=1e-6)
