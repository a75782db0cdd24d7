"""The selection study's rule: what it picks from validation alone, how ties break, and the regret it reports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.selection_study import CONFIGS, SCORE_VARIANTS, apply_rule, regret, validation_sets


def _frame(lesion: dict[tuple[str, int], float], test: dict[tuple[str, int], float]) -> pd.DataFrame:
    """Two datasets, every configuration at epochs 0, 1 and 10, every score variant; lesion/test AUROC overrides."""
    rows = []
    for dataset in ("brainmri", "covid"):
        for name, options in CONFIGS.items():
            for epoch in (0, 1, 10):
                for root, sigma in SCORE_VARIANTS:
                    default = root and sigma == 4
                    rows.append(
                        {
                            "dataset": dataset,
                            "seed": 1024,
                            "config": name,
                            **options,
                            "epoch": epoch,
                            "score_sqrt": root,
                            "sigma": sigma,
                            "lesion_auroc": lesion.get((name, epoch), 0.5) if default else 0.4,
                            "test_AUROC": test.get((name, epoch), 0.7),
                        }
                    )
    return pd.DataFrame(rows)


def test_the_rule_picks_the_best_mean_lesion_auroc_and_never_looks_at_test() -> None:
    frame = _frame({("hard-g1", 10): 0.9}, {("hard-g4", 10): 0.99, ("hard-g1", 10): 0.8})
    pick = apply_rule(frame)
    assert (pick.config, pick.epoch, bool(pick.score_sqrt), pick.sigma) == ("hard-g1", 10, True, 4.0)
    table = regret(frame, pick).set_index("dataset")
    assert table.loc["covid", "pick test AUROC"] == pytest.approx(0.8)
    assert table.loc["covid", "best test AUROC"] == pytest.approx(0.99)
    assert table.loc["covid", "regret"] == pytest.approx(-0.19)


def test_ties_go_to_fewer_epochs_then_the_rule_order() -> None:
    # Epoch 0 (before training) is not a candidate even when it scores best.
    frame = _frame({("ref-sq", 10): 0.8, ("hard-g2", 1): 0.8, ("hard-g4", 1): 0.8, ("ref-g4", 0): 0.95}, {})
    pick = apply_rule(frame)
    assert (pick.config, pick.epoch) == ("hard-g4", 1)


def test_validation_sets_are_seeded_and_change_only_the_anomalous_copies() -> None:
    rng = np.random.default_rng(0)
    normals = []
    for _ in range(3):
        image = np.zeros((3, 96, 96), dtype=np.float32)
        image[:, 12:84, 12:84] = 0.5 + 0.05 * rng.standard_normal((72, 72)).astype(np.float32)
        normals.append(torch.from_numpy(image))
    sets = validation_sets(normals, seed=7)
    again = validation_sets(normals, seed=7)
    assert sets["normal"] is normals
    for name in ("lesion", "perlin"):
        assert len(sets[name]) == 3
        for original, changed, repeated in zip(normals, sets[name], again[name], strict=True):
            assert changed.shape == original.shape
            assert not torch.equal(changed, original)
            assert torch.equal(changed, repeated)
            assert changed.min() >= 0
            assert changed.max() <= 1


def test_a_configuration_missing_on_one_dataset_is_not_a_candidate() -> None:
    frame = _frame({("hard-g2", 1): 0.99}, {})
    frame = frame[~((frame.config == "hard-g2") & (frame.dataset == "covid"))]
    pick = apply_rule(frame)
    assert pick.config != "hard-g2"
    assert "hard-g2" not in set(regret(frame, pick)["best candidate"].str.split(",").str[0])
