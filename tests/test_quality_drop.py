"""quality_drop: the paired per-clip drop against dense and its bootstrap interval, on constructed cases."""

import math

import pytest
import torch

from gatesearch.objectives import quality_drop


def test_keep_all_gate_has_a_zero_interval():
    dense = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    out = quality_drop(dense, dense.clone(), seed=0)
    assert (out.drop, out.low, out.high, out.clips) == (0.0, 0.0, 0.0, 6)


def test_drop_and_interval_of_a_known_binomial_case():
    """400 clips, the trial loses 20 the dense network gets right: drop 0.05, and the bootstrap interval is the
    normal one, 0.05 ± 1.96·sqrt(p(1 − p)/n) (± 0.0214), within resampling error."""
    n, lost = 400, 20
    dense = torch.ones(n)
    trial = dense.clone()
    trial[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:lost]] = 0.0
    out = quality_drop(dense, trial, seed=0, resamples=4000)
    p = lost / n
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert out.drop == pytest.approx(p)
    assert out.low == pytest.approx(p - half, abs=0.004) and out.high == pytest.approx(p + half, abs=0.004)
    assert out.clips == n


def test_pairing_cancels_what_both_get_wrong_and_a_better_trial_has_a_negative_drop():
    """Clips both models miss add nothing; a trial that fixes clips dense missed has a negative drop."""
    dense = torch.tensor([0.0] * 50 + [1.0] * 50)
    trial = dense.clone()
    trial[:5] = 1.0  # fixes 5 of the clips dense misses
    out = quality_drop(dense, trial, seed=0)
    assert out.drop == pytest.approx(-0.05)
    assert out.low < out.drop < out.high <= 0.0


def test_per_clip_pck_values_and_the_same_seed_gives_the_same_interval():
    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(64, generator=gen)
    trial = (dense - 0.02 * torch.rand(64, generator=gen)).clamp(0, 1)
    a, b = quality_drop(dense, trial, seed=7), quality_drop(dense, trial, seed=7)
    assert a == b
    assert a.drop == pytest.approx(float((dense - trial).mean()))
    assert 0.0 < a.low < a.drop < a.high < 0.02


def test_clips_must_pair_up():
    with pytest.raises(ValueError, match="same clips"):
        quality_drop(torch.ones(4), torch.ones(5), seed=0)
