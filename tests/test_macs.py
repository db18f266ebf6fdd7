"""MAC accounting against hand counts on toy nets."""

import pytest
import torch
from torch import nn

from gatesearch.objectives import MacCounter, dense_macs
from gatesearch.policies.norm_gates import NormGate
from gatesearch.policies.skipconv import convert_convs
from gatesearch.stateful import reset_state, streaming


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)  # 16x16 -> 16x16: 8*3*9*256 = 55296
        self.b = nn.Conv2d(8, 4, 1, stride=2)  # 16x16 -> 8x8: 4*8*64 = 2048
        self.fc = nn.Linear(4, 5)  # 20

    def frame(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_dense_counts_match_hand_count():
    total, per = dense_macs(Toy(), (3, 16, 16))
    assert per["a"] == 55296 and per["b"] == 2048 and per["fc"] == 20
    assert total == 55296 + 2048 + 20


def test_effective_macs_follow_measured_density():
    model = Toy().eval()
    convert_convs(model, lambda conv: NormGate(1e9, output_norm=False), block_size=1)
    counter = MacCounter(model, (3, 16, 16))
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode(), streaming(model):
        for t in range(4):  # frame 0 dense, frames 1-3 fully skipped (huge ε)
            model.frame(x + t)
    report = counter.report()
    assert report.layers["a"].density == pytest.approx(0.25)
    assert report.layers["b"].density == pytest.approx(0.25)
    gate_a = (3 * 256 + 9 * 256) * 3 / 4  # channel sum + 3x3 box sum, on 3 of 4 frames
    gate_b = (8 * 256 + 1 * 64) * 3 / 4
    expected = 55296 * 0.25 + gate_a + 2048 * 0.25 + gate_b + 20
    assert report.effective == pytest.approx(expected)
    assert report.dense == 55296 + 2048 + 20
    assert report.mean_density == pytest.approx(0.25)


def test_counter_reset_and_reference_frames():
    model = Toy().eval()
    convert_convs(model, lambda conv: NormGate(0.0, output_norm=False), block_size=1)
    counter = MacCounter(model, (3, 16, 16))
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode(), streaming(model):
        model.frame(x)
        counter.reset()
        model.frame(x)  # identical frame: nothing changes, nothing computed
        assert counter.report().layers["a"].density == 0.0
        reset_state(model)
        counter.reset()
        model.frame(x)  # reference frame after a reset: dense
        assert counter.report().layers["a"].density == 1.0
