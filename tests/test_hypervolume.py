"""Hypervolume of a constructed front against hand-computed areas; reference points; budgets."""

import math

import pytest

from gatesearch.search.hypervolume import HypervolumeHistory, Reference, hypervolume, reference_point
from gatesearch.spaces import SpaceError
from gatesearch.spaces.objectives import (
    Constraints,
    HypervolumeReference,
    parse_constraints,
    parse_hypervolume_reference,
)

REF = Reference(quality=0.5, cost=4.0)


def test_hypervolume_equals_the_hand_computed_area():
    # (0.9, 3): [0.5, 0.9] x [3, 4] = 0.4; (0.7, 1): [0.5, 0.7] x [1, 4] = 0.6; overlap [0.5, 0.7] x [3, 4] = 0.2
    assert hypervolume([(0.9, 3.0), (0.7, 1.0)], REF) == pytest.approx(0.8)
    # a dominated point and points beyond the reference add nothing
    assert hypervolume([(0.9, 3.0), (0.7, 1.0), (0.6, 2.0), (0.4, 0.5), (0.95, 5.0)], REF) == pytest.approx(0.8)
    # a third point on the front: (0.8, 2) adds [0.7, 0.8] x [2, 3] = 0.1
    assert hypervolume([(0.9, 3.0), (0.7, 1.0), (0.8, 2.0)], REF) == pytest.approx(0.9)
    assert hypervolume([], REF) == 0.0


def test_history_never_shrinks_and_leaves_infeasible_trials_out():
    h = HypervolumeHistory(reference=REF, cost_key="macs")
    trial = lambda q, c: {"quality": q, "macs": c}
    assert h.add(trial(0.7, 1.0)) == pytest.approx(0.6)
    assert h.add(trial(0.99, 0.1), feasible=False) == pytest.approx(0.6)
    assert h.add(trial(0.6, 2.0)) == pytest.approx(0.6)
    assert h.add(trial(0.9, 3.0)) == pytest.approx(0.8)
    assert h.values == pytest.approx([0.6, 0.6, 0.6, 0.8]) and h.current == pytest.approx(0.8)
    assert HypervolumeHistory(cost_key="macs").add(trial(0.7, 1.0)) is None  # no reference, no dense figures


def test_history_takes_its_reference_from_the_first_trials_dense_figures():
    h = HypervolumeHistory(HypervolumeReference(quality=0.5), cost_key="macs")
    assert h.add({"quality": 0.7, "macs": 1.0, "dense_macs": 4.0}) == pytest.approx(0.6)
    assert h.reference == REF
    assert h.add({"quality": 0.9, "macs": 3.0, "dense_macs": 100.0}) == pytest.approx(0.8)  # fixed once set


def test_reference_point_from_yaml_dense_and_budget():
    dense = [(0.8, 3.0), (0.9, 5.0)]
    assert reference_point(HypervolumeReference(), dense=dense) == Reference(0.0, 5.0)
    assert reference_point(HypervolumeReference(quality=0.5, cost=2.0), dense=dense) == Reference(0.5, 2.0)
    got = reference_point(HypervolumeReference(), dense=dense, constraints=Constraints(max_quality_drop=0.1))
    assert got.quality == pytest.approx(0.7) and got.cost == 5.0
    assert reference_point(HypervolumeReference(), dense=[]) is None
    assert parse_hypervolume_reference({"quality": 0.5, "macs": 1e6}, "macs") == HypervolumeReference(quality=0.5,
                                                                                                     cost=1e6)
    with pytest.raises(SpaceError, match="hypervolume_reference.latency_ms: unknown key; known: quality, macs"):
        parse_hypervolume_reference({"latency_ms": 3}, "macs")


def test_constraints_values_and_feasibility():
    c = parse_constraints({"max_latency_ms": 2, "max_quality_drop": 0.05})
    assert c.named() == {"max_latency_ms": 2.0, "max_quality_drop": 0.05}
    v = c.violations({"latency_ms": 2.5, "quality_drop": 0.01, "macs": 9e9})
    assert v["max_latency_ms"] == pytest.approx(0.5) and v["max_quality_drop"] == pytest.approx(-0.04)
    assert not c.feasible({"latency_ms": 2.5, "quality_drop": 0.01})
    assert c.feasible({"latency_ms": 1.5, "quality_drop": 0.05})
    assert c.violations({"latency_ms": 1.0})["max_quality_drop"] == math.inf  # not reported: not met
    assert Constraints().feasible({})
    with pytest.raises(SpaceError, match="constraints.max_macs: must be a finite number >= 0"):
        parse_constraints({"max_macs": -1})
    with pytest.raises(SpaceError, match="constraints.max_flops: unknown key"):
        parse_constraints({"max_flops": 1})
    with pytest.raises(SpaceError, match="constraints.max_macs: expected float, got '5e6'"):
        parse_constraints({"max_macs": "5e6"})
