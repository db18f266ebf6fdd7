"""The Skip-Conv Gumbel gate (Eq. 8) and its MAC-weighted loss (Eq. 9)."""

import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.objectives import MacCounter
from gatesearch.policies import POLICIES, build_policy, force_open
from gatesearch.policies.gumbel import GumbelGate, gate_loss, layer_macs
from gatesearch.policies.skipconv import convert_convs, skip_layers
from gatesearch.stateful import streaming


class Toy(nn.Module):
    """Two convs of very different cost, with ``frame`` like a VideoModel."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)  # 16x16 -> 16x16: 8*3*9*256 = 55296 MACs
        self.b = nn.Conv2d(8, 4, 1, stride=2)  # 16x16 -> 8x8: 4*8*64 = 2048 MACs

    def frame(self, x):
        return self.b(torch.relu(self.a(x)))

    forward = frame


def toy(block_size=1):
    torch.manual_seed(0)
    model = Toy()
    convert_convs(model, GumbelGate, block_size=block_size)
    return model


def set_logit(gate, value):
    """f ≡ value everywhere: zero weights, bias at ``value`` (stored divided by the bias gain)."""
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.fill_(value / gate.settings.bias_gain)


def stream_frames(model, xs):
    outs = []
    with streaming(model):
        for x in xs:
            outs.append(model.frame(x).clone())
    return outs


def frames(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, 16, 16, generator=g) for _ in range(n)]


def test_registered_with_beta_and_block_size():
    cls = POLICIES.get("gumbel")
    assert cls.trains_gates
    takes = cls.takes()
    assert list(takes) == ["beta", "block_size"]
    assert takes["beta"].default == {"low": 1e-3, "high": 1.0, "log": True}
    assert takes["block_size"].default == [1, 2, 4, 8]


def test_space_samples_beta_for_gumbel_only():
    import optuna

    from gatesearch.spaces import parse_search_config

    cfg = parse_search_config({"space": {"gate": ["gumbel", "input_norm"],
                                         "gates": {"gumbel": {"beta": {"low": 0.01, "high": 1.0, "log": True}}}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        tc = cfg.space.suggest(trial)
        seen.add(tc.gate)
        if tc.gate == "gumbel":
            assert set(tc.knobs) == {"beta", "block_size"} and 0.01 <= tc.knobs["beta"] <= 1.0
        else:
            assert "beta" not in tc.knobs
    assert seen == {"gumbel", "input_norm"}


def test_gate_is_one_channel_conv_with_the_layers_geometry():
    """f(r; φ_l) has the layer's kernel, stride, padding and dilation and no groups (Sec. 3.2.2)."""
    model = nn.Sequential(nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=3))
    convert_convs(model, GumbelGate, block_size=1)
    layer = skip_layers(model)[0]
    assert layer.gate.weight.shape == (1, 6, 3, 3)
    r = torch.randn(2, 6, 15, 15)
    assert layer.gate.logits(r, layer).shape == layer.conv(r).shape[:1] + (1,) + layer.conv(r).shape[2:]
    assert not [n for n, _ in layer.gate.named_modules() if n], "the gate holds bare parameters, no Conv2d to convert"


def test_starts_open_where_anything_changed_and_inference_rounds_the_sigmoid():
    """At the start (w ≥ 0, b = 0) every changed position is open and every still one closed; at inference
    g = round(σ(f)) = [f > 0] (Eq. 8), f a conv on |r|."""
    model = toy().eval()
    layer = skip_layers(model)[0]
    r = torch.randn(2, 3, 16, 16) * 0.1
    assert layer.gate.block_mask(r, layer).all()
    r[:, :, :8] = 0  # the top half still: its outputs whose support lies in it see no change at all
    assert not layer.gate.block_mask(r, layer)[:, :7].any() and layer.gate.block_mask(r, layer)[:, 8:].all()
    set_logit(layer.gate, -0.05)
    with torch.no_grad():
        layer.gate.weight[0, 0, 1, 1] = 1.0  # f = |r[:, 0]| - 0.05 at the centre tap
    m1, m2 = layer.gate.block_mask(r, layer), layer.gate.block_mask(r, layer)
    assert torch.equal(m1, m2), "inference is deterministic"
    assert torch.equal(m1, torch.sigmoid(r[:, 0].abs() - 0.05).round() > 0)


def test_a_change_is_gated_by_its_size_not_its_sign():
    """The defect of a gate linear in r (docs/fidelity.md finding 2, before): whatever its weights, a gate that
    keeps a change keeps the opposite change too, and never keeps a still position it would skip when moving."""
    model = toy().eval()
    layer = skip_layers(model)[0]
    torch.manual_seed(1)
    with torch.no_grad():
        layer.gate.weight.normal_()  # signed weights, as training may leave them
        layer.gate.bias.fill_(-2.0 / layer.gate.settings.bias_gain)
    r = torch.randn(4, 3, 16, 16)
    mask = layer.gate.block_mask(r, layer)
    assert 0 < mask.float().mean() < 1
    assert torch.equal(mask, layer.gate.block_mask(-r, layer))
    with torch.no_grad():
        layer.gate.weight.abs_()  # as at the start: a larger change at every tap never closes a position
    small, large = layer.gate.block_mask(0.1 * r, layer), layer.gate.block_mask(0.2 * r, layer)
    assert (large >= small).all() and large.sum() > small.sum() and 0 < small.float().mean() < 1
    assert not layer.gate.block_mask(torch.zeros_like(r), layer).any(), "f = b < 0 where nothing changed"


def test_untrained_gate_computes_the_dense_network_and_skips_what_stands_still():
    """Converted and not trained, the gated network is the dense one (Eq. 2: only zero residuals skipped), yet
    it skips the still part of a clip: fine-tuning starts from the dense network's accuracy."""
    from gatesearch.backbones import build
    from gatesearch.objectives import reset_stats

    torch.manual_seed(0)
    dense = build("tiny", task="heatmap", num_classes=4).eval()
    model = build_policy("gumbel", beta=1.0, block_size=1).apply(copy.deepcopy(dense)).eval()
    clip = torch.rand(2, 1, 3, 32, 32).repeat(1, 6, 1, 1, 1)
    clip[:, :, :, 20:, 20:] += torch.rand(2, 6, 3, 12, 12)  # one corner moves, the rest stands still
    reset_stats(model)
    with torch.inference_mode():
        want, got = dense(clip), model.stream(clip, reset_every=3)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    first = skip_layers(model)[0]
    assert first.density < 0.75, "the still three quarters of the first layer's outputs are skipped"


@pytest.mark.parametrize("block_size", [1, 4])
def test_fresh_gate_is_the_input_norm_gate_with_eps_minus_b(block_size):
    """At conversion f = ‖r‖₁ over the layer's support + b (every weight 1): the Input-Norm gate (Eq. 5) with
    ε = −b, position for position. At nn.Conv2d's random scale the content term stayed below 1 and the noise of
    the training sample, not the residual, decided (fine-tuned, inference then closed every position)."""
    from gatesearch.policies.norm_gates import NormGate

    model = toy(block_size).eval()
    torch.manual_seed(0)
    for layer, cin, support in zip(skip_layers(model), (3, 8), (27, 8)):
        eps = 0.4 * support  # E|r| 0.8 · 0.5 at the middle of the ramp
        with torch.no_grad():
            layer.gate.bias.fill_(-eps / layer.gate.settings.bias_gain)
        r = torch.randn(2, cin, 16, 16) * torch.linspace(0, 1, 16)  # still on the left, moving on the right
        want = NormGate(eps, output_norm=False).block_mask(r, layer)
        assert torch.equal(layer.gate.block_mask(r, layer), want)
        assert 0.2 < want.float().mean() < 0.8, "the residual, not the bias alone, decides"


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_training_draws_bernoulli_of_sigmoid(p):
    """In training a position is kept with probability σ(f) (Gumbel-sigmoid sampling, Eq. 8)."""
    model = toy().train()
    layer = skip_layers(model)[0]
    set_logit(layer.gate, math.log(p / (1 - p)))
    torch.manual_seed(0)
    r = torch.randn(64, 3, 16, 16)
    mask = layer.gate.train_mask(r, layer, (16, 16))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}, "straight-through keeps the forward value exactly 0/1"
    assert mask.mean().item() == pytest.approx(p, abs=0.01)
    assert layer.gate.block_mask(r, layer).float().mean().item() == pytest.approx(p, abs=0.01)


@pytest.mark.parametrize("block_size", [2, 4])
@pytest.mark.parametrize("training", [True, False])
def test_structured_mask_is_constant_on_blocks(block_size, training):
    """Max-pool b then nearest upsample b ("Structured Sparsity"): constant on each b×b block."""
    model = toy(block_size).train(training)
    layer = skip_layers(model)[0]
    set_logit(layer.gate, -1.0)
    with torch.no_grad():
        layer.gate.weight.normal_(std=0.1)  # f ~ N(-1, 0.5²): some blocks kept, some skipped
    torch.manual_seed(0)
    r = torch.randn(4, 3, 16, 16)
    mask = layer.gate.train_mask(r, layer, (16, 16)).detach()  # (4, 1, 16, 16)
    b = block_size
    blocks = mask.reshape(4, 16 // b, b, 16 // b, b)
    assert torch.equal(blocks.amax((2, 4)), blocks.amin((2, 4)))
    assert 0 < mask.mean() < 1


def test_block_mask_agrees_with_position_mask_at_inference():
    """round(σ(max f)) = max round(σ(f)): pooling the logits gives the max-pooled hard mask."""
    model = toy(4).eval()
    layer = skip_layers(model)[0]
    set_logit(layer.gate, -0.5)
    with torch.no_grad():
        layer.gate.weight.normal_()
    r = torch.randn(3, 3, 16, 16)
    hard = (layer.gate.logits(r, layer) > 0).float()  # (3, 1, 16, 16)
    assert torch.equal(layer.gate.block_mask(r, layer), F.max_pool2d(hard, 4, 4).squeeze(1) > 0)


@pytest.mark.parametrize("conv, size, block", [
    (nn.Conv2d(3, 8, 7, stride=2, padding=3), 30, 4),  # an RGB stem: fewer channels than a vector
    (nn.Conv2d(20, 8, 3, padding=1), 13, 2),  # a vector and a remainder of channels
    (nn.Conv2d(32, 8, 3, padding=2, dilation=2), 12, 1),
    (nn.Conv2d(16, 8, 1, stride=2), 19, 4),
])
def test_inference_plan_reads_the_pair_and_matches_the_gate_on_the_residual(conv, size, block):
    """The C++ plan (f > 0 from x and x_prev, no residual tensor) gives the generic gate's mask on r = x - x_prev."""
    from gatesearch.ops import _native
    from gatesearch.policies.skipconv import SkipConv2d

    if not _native.available():
        pytest.skip("C++ kernels unavailable")
    torch.manual_seed(0)
    layer = SkipConv2d(conv, GumbelGate(conv), block_size=block).eval()
    layer.gate.weight.data.normal_()  # signed weights, as training may leave them: f = w * |r| is of either sign
    layer.gate.bias.data.fill_(0.0)  # about half the moving blocks open, the still ones closed
    x_prev, x = (torch.randn(2, conv.in_channels, size, size).contiguous(memory_format=torch.channels_last)
                 for _ in range(2))
    x[:, :, : size // 2] = x_prev[:, :, : size // 2]  # a still half: those blocks see a zero residual
    out_hw = tuple(conv(x[:1]).shape[-2:])
    with torch.inference_mode():
        fast, r = layer.gate.plan(layer, x, out_hw)(x, x_prev)
        want = layer.gate.block_mask(x - x_prev, layer)
    assert r is None and fast.dtype == torch.bool
    assert torch.equal(fast, want) and 0 < want.float().mean() < 1


def test_gradient_reaches_gate_parameters():
    """Straight-through: both L_task and L_gate (Eq. 9) reach φ_l of every layer."""
    model = toy().train()
    out = torch.stack(stream_frames(model, frames()))
    out.square().mean().backward(retain_graph=True)  # a task-like loss only
    for layer in skip_layers(model):
        assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    model.zero_grad()
    gate_loss(model).backward()
    for layer in skip_layers(model):
        assert layer.gate.bias.grad.item() > 0, "descending L_gate lowers the bias: fewer positions kept"


def test_gate_loss_weights_layers_by_normalised_macs():
    """Eq. 9 with footnote 2: L_gate = Σ_l m_l E[g_l] over residual frames, m_l = MACs_l / Σ MACs."""
    model = toy().train()
    a, b = skip_layers(model)
    set_logit(a.gate, 50.0)  # always kept
    set_logit(b.gate, -50.0)  # always skipped
    assert layer_macs(a.conv, (16, 16)) == 55296 and layer_macs(b.conv, (8, 8)) == 2048
    stream_frames(model, frames(4))
    assert len(a.gate.expected) == 3, "t = 2..T only: the first frame is dense and not gated"
    loss = gate_loss(model)
    assert loss.item() == pytest.approx(55296 / (55296 + 2048))
    assert gate_loss(model) is None, "records are drained by the loss"


def test_policy_loss_is_beta_times_gate_loss():
    model = toy().train()
    for layer in skip_layers(model):
        set_logit(layer.gate, 50.0)
    stream_frames(model, frames(3))
    assert build_policy("gumbel", beta=0.25, block_size=1).loss(model).item() == pytest.approx(0.25)
    stream_frames(model, frames(3))
    assert build_policy("gumbel", beta=0.0, block_size=1).loss(model) is None
    assert all(not layer.gate.expected for layer in skip_layers(model)), "β = 0 still drains the records"


def test_no_records_at_inference():
    model = toy().eval()
    with torch.inference_mode():
        stream_frames(model, frames())
    assert gate_loss(model) is None


def test_gate_cost_counted_in_macs():
    """A gate costs Ci·kh·kw MACs per output position of the layer, on residual frames."""
    model = toy().eval()
    counter = MacCounter(model, (3, 16, 16))
    with torch.inference_mode():
        stream_frames(model, frames(4))
    report = counter.report()
    assert report.layers["a"].gate == pytest.approx(3 * 9 * 256 * 3 / 4)
    assert report.layers["b"].gate == pytest.approx(8 * 1 * 64 * 3 / 4)
    assert report.layers["a"].density == 1.0  # open at init
    force_open(model)
    counter.reset()
    with torch.inference_mode():
        stream_frames(model, frames(4))
    assert counter.report().layers["a"].gate == 0.0, "a forced-open gate is not evaluated"


def test_closed_gates_repeat_the_reference_frame_every_t_test():
    """T_test (Table 4): with all gates closed, frames repeat their reference; references every T_test."""
    from gatesearch.backbones import build

    torch.manual_seed(0)
    model = build_policy("gumbel", beta=1.0, block_size=2).apply(build("tiny", task="heatmap", num_classes=4)).eval()
    for layer in skip_layers(model):
        set_logit(layer.gate, -50.0)
    clip = torch.rand(1, 8, 3, 32, 32)
    with torch.inference_mode():
        dense = model(clip)
        every4 = model.stream(clip, reset_every=4)
        once = model.stream(clip, reset_every=None)
    for t in range(8):
        assert torch.allclose(every4[:, t], dense[:, 4 * (t // 4)], atol=1e-4)
        assert torch.allclose(once[:, t], dense[:, 0], atol=1e-4)


def test_gate_weights_train_at_their_lr_scale(monkeypatch):
    """Adam moves a parameter about lr a step whatever β is, so from 1 (the Input-Norm start) the gate's weights
    could not close what β asks within a short fine-tuning: they train at ``weight_lr_scale`` × lr (the same
    training with the scale at 1 moves them a fraction as far), the rest of the network at lr."""
    import dataclasses

    from gatesearch.models import build_model
    from gatesearch.policies.gumbel import Gumbel
    from gatesearch.search.trial import load_clips, num_classes, train
    from gatesearch.spaces import DataConfig, TrialConfig

    data = DataConfig(train_clips=8, val_clips=2, synthetic={"height": 32, "width": 32})
    clips = load_clips(data, frames=3, count=8, split="train")
    cfg = TrialConfig(gate="gumbel", knobs={"beta": 1.0, "block_size": 1}, clip_length=3, epochs=2, batch_size=4,
                      lr=1e-3, seed=0)

    def gate_moves(settings):
        monkeypatch.setattr(Gumbel, "settings", settings)
        model = build_model(cfg, num_classes(data))
        before = [layer.gate.weight.detach().clone() for layer in skip_layers(model)]
        train(model, cfg, clips)
        return torch.cat([(layer.gate.weight.detach() - w).abs().flatten()
                          for layer, w in zip(skip_layers(model), before)]).mean().item()

    default = Gumbel.settings
    assert default.weight_lr_scale >= 10
    scaled, plain = gate_moves(default), gate_moves(dataclasses.replace(default, weight_lr_scale=1.0))
    assert scaled > default.weight_lr_scale / 4 * plain, (scaled, plain)


def test_beta_lowers_macs_on_the_synthetic_task():
    """Issue 3 bar: on a fixed seed, effective MACs fall strictly as β grows, and quality is measured."""
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise repeatable, and immune to oversubscribed cores (2 threads can be 100× slower)
    try:
        macs, dense = _macs_for_betas((0.0, 1.0, 10.0))
    finally:
        torch.set_num_threads(threads)
    assert len(set(dense)) == 1
    assert macs[0] > macs[1] > macs[2], macs
    assert macs[2] < 0.5 * dense[0], "a large β must skip most residual work"
    assert time.perf_counter() - t0 < 60


def _macs_for_betas(betas):
    """Train and evaluate one small Gumbel trial per β on the same seed and data: (effective, dense) MACs."""
    from gatesearch.models import build_model
    from gatesearch.search.trial import evaluate, load_clips, num_classes, train
    from gatesearch.spaces import DataConfig, EvalConfig, TrialConfig

    data = DataConfig(train_clips=32, val_clips=8, synthetic={"height": 32, "width": 32})
    evaluation = EvalConfig(frames=8, latency_warmup=0, latency_repeats=1)
    train_clips = load_clips(data, frames=4, count=data.train_clips, split="train")
    val_clips = load_clips(data, frames=evaluation.frames, count=data.val_clips, split="val")
    macs, dense = [], []
    for beta in betas:
        cfg = TrialConfig(gate="gumbel", knobs={"beta": beta, "block_size": 1}, clip_length=4, epochs=6,
                          batch_size=4, lr=1e-2, seed=0)
        model = build_model(cfg, num_classes(data))  # seeds the global RNG: weights, then the Gumbel noise
        layer = skip_layers(model)[0]
        before = layer.gate.bias.detach().clone()
        train(model, cfg, train_clips)
        if beta:
            assert not torch.equal(layer.gate.bias.detach(), before), "training must move the gate"
        for skip_layer in skip_layers(model):
            skip_layer.path = "dense"  # MACs do not depend on the kernel; skip the timed crossover calibration
        metrics = evaluate(model, cfg, val_clips, evaluation).metrics
        assert 0.0 <= metrics["quality"] <= 1.0
        macs.append(metrics["macs"])
        dense.append(metrics["dense_macs"])
    return macs, dense
