"""The best-epoch record of ``run.select_epoch=holdout`` (:mod:`rp2k_dist.engine.selection`)."""

from __future__ import annotations

import torch

from rp2k_dist.engine.selection import SelectedEpoch


def test_the_best_epoch_is_kept_as_a_copy_and_ties_keep_the_earlier_one():
    model = torch.nn.Linear(3, 2)
    selected = SelectedEpoch()
    assert selected.consider(1, 40.0, model) and selected.epoch == 1
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on: the kept weights must not follow
    assert not selected.consider(2, 40.0, model) and selected.epoch == 1
    torch.testing.assert_close(selected.model["weight"], kept)
    assert not selected.consider(3, 10.0, model)
    assert selected.consider(4, 55.5, model) and (selected.epoch, selected.top1) == (4, 55.5)
    torch.testing.assert_close(selected.model["weight"], model.weight.detach())


def test_the_record_survives_a_checkpoint_round_trip():
    selected = SelectedEpoch()
    selected.consider(3, 71.0, torch.nn.Linear(2, 2))
    restored = SelectedEpoch.from_checkpoint(selected.to_checkpoint())
    assert (restored.epoch, restored.top1) == (3, 71.0)
    assert restored.model.keys() == selected.model.keys()
    assert SelectedEpoch.from_checkpoint(None) == SelectedEpoch()
