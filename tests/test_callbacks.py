"""Label-free validation quantities and the checkpoint callback that selects by them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_adfa.callbacks import LabelFreeCheckpoint, label_free_quantity


def test_quantities_on_known_scores() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 2.5, 10.0, 12.0])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert label_free_quantity(scores, labels, "synthetic_auroc") == pytest.approx(8 / 9)  # 2.5 loses to 3
    assert label_free_quantity(scores, labels, "normal_score") == pytest.approx(2.0)
    # (mean synthetic - mean normal) / std of the normals = (8.1667 - 2) / 1.
    assert label_free_quantity(scores, labels, "synthetic_separation") == pytest.approx(49 / 6 - 2)


def test_quantities_refuse_a_validation_set_without_the_images_they_need() -> None:
    normals = torch.tensor([0, 0, 0])
    with pytest.raises(ValueError, match="val_split_mode synthetic"):
        label_free_quantity(torch.tensor([1.0, 2.0, 3.0]), normals, "synthetic_auroc")
    with pytest.raises(ValueError, match="needs normal validation images"):
        label_free_quantity(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]), "normal_score")


def test_checkpoint_monitors_the_quantity_in_its_direction() -> None:
    assert (LabelFreeCheckpoint().monitor, LabelFreeCheckpoint().mode) == ("val_synthetic_separation", "max")
    normal = LabelFreeCheckpoint(quantity="normal_score")
    assert (normal.monitor, normal.mode) == ("val_normal_score", "min")
    with pytest.raises(ValueError, match="unknown selection quantity"):
        LabelFreeCheckpoint(quantity="test_auroc")


def test_score_csv_writer_never_replaces_a_file(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from anomalib_adfa.callbacks import ScoreCSVWriter
    from anomalib_adfa.errors import ConfigurationError

    earlier = tmp_path / "scores.csv"
    earlier.write_text("earlier\n")
    trainer = SimpleNamespace(world_size=1, global_rank=0, default_root_dir=str(tmp_path), ckpt_path=None)
    with pytest.raises(ConfigurationError, match=r"scores\.csv exists; give a new file name"):
        ScoreCSVWriter(csv_path=earlier).on_predict_end(trainer, None)
    assert earlier.read_text() == "earlier\n"
    ScoreCSVWriter().on_predict_end(trainer, None)  # the default: a new folder of the run
    assert (tmp_path / "predictions" / "0" / "scores.csv").read_text().startswith("image_path,pred_score,pred_label")
