"""Early stopping by dominance: the rung rule on constructed reports, through the Ray Tune scheduler itself."""

from types import SimpleNamespace

import pytest

from gatesearch.search.dominance import Rungs, dominance_scheduler
from gatesearch.search.pareto import nondominated_fronts, pareto_indices
from gatesearch.spaces import SpaceError
from gatesearch.spaces.objectives import EarlyStopping, parse_early_stopping


def report(epoch, quality, macs, epochs=8):
    return {"epoch": epoch, "epochs": epochs, "epoch_quality": quality, "epoch_macs": macs, "train_loss": 1.0}


def test_nondominated_fronts_peel_front_after_front():
    losses = [(1, 5), (2, 2), (5, 1), (3, 3), (6, 6), (4, 4)]
    assert nondominated_fronts(losses) == [[0, 1, 2], [3], [5], [4]]
    assert pareto_indices([(-1, 5), (-2, 2), (-3, 3)]) == [0, 1]  # quality ↑ as -loss, cost ↓


def test_scheduler_stops_a_dominated_trial_and_keeps_a_non_dominated_one():
    scheduler = dominance_scheduler(Rungs([2], reduction_factor=3))
    decide = lambda tid, r: scheduler.on_trial_result(None, SimpleNamespace(trial_id=tid), r)
    assert decide("a", report(1, 0.1, 1e6)) == "CONTINUE"  # no rung at epoch 1
    assert decide("a", report(2, 0.8, 1e6)) == "CONTINUE"  # first at the rung
    # b is worse in both objectives than a: half the rung lies in a better front, more than 1/η = 1/3
    assert decide("b", report(2, 0.5, 2e6)) == "STOP"
    # c has the best quality at a higher cost: no trial at the rung dominates it
    assert decide("c", report(2, 0.9, 3e6)) == "CONTINUE"
    assert scheduler.rungs.stopped == {"b": 2}
    assert decide("c", report(3, 0.9, 3e6)) == "CONTINUE"  # past the rung
    assert decide("c", {"quality": 0.9, "latency_ms": 1.0}) == "CONTINUE"  # the final report


def test_keeps_the_top_share_one_over_eta():
    rungs = Rungs([1], reduction_factor=2)
    assert not rungs.decide("a", report(1, 0.8, 1.0))
    assert not rungs.decide("b", report(1, 0.7, 2.0))  # dominated, but 1/2 of the rung is not more than 1/η
    assert rungs.decide("c", report(1, 0.6, 3.0))  # 2 of 3 in better fronts


def test_a_rung_at_or_past_the_trials_last_epoch_is_not_applied():
    rungs = Rungs([4], reduction_factor=3)
    assert not rungs.decide("a", report(4, 0.9, 1.0, epochs=8))
    assert not rungs.decide("b", report(4, 0.1, 9.0, epochs=4))  # its last epoch: nothing to save
    assert rungs.decide("c", report(4, 0.1, 9.0, epochs=8))


def test_milestones_and_config():
    es = parse_early_stopping({"kind": "dominance", "grace_period": 1, "reduction_factor": 3})
    assert es.enabled and es.milestones(10) == (1, 3, 9)
    assert es.milestones(9) == (1, 3)
    assert EarlyStopping(kind="dominance", rungs=1).milestones(10) == (1,)
    assert EarlyStopping(grace_period=2, reduction_factor=1.5).milestones(8) == (2, 3, 4, 7)
    assert not parse_early_stopping(None).enabled


@pytest.mark.parametrize("raw, message", [
    ({"kind": "asha"}, "early_stopping.kind: 'asha' is not one of off, dominance"),
    ({"reduction_factor": 1}, "early_stopping.reduction_factor: must be > 1"),
    ({"grace_period": 0}, "early_stopping.grace_period: must be >= 1"),
    ({"grace": 1}, "early_stopping.grace: unknown key"),
    ({"rungs": 1.5}, "early_stopping.rungs: expected int"),
    ([1], "early_stopping: expected a mapping"),
])
def test_bad_early_stopping_is_one_line_naming_the_key(raw, message):
    with pytest.raises(SpaceError, match=message.replace("(", r"\(")):
        parse_early_stopping(raw)
