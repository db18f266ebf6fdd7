"""VA-RED² (thesis Chapter 3, Appendix A.2): gate, dynamic conv, shared weights, efficiency loss, accounting."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gatesearch.backbones import build
from gatesearch.objectives import MacCounter, dense_macs
from gatesearch.policies import POLICIES, build_policy, force_open
from gatesearch.policies.vared2 import DynamicConv, correct_clips, dynamic_layers, efficiency_loss
from gatesearch.policies.vared2 import layer as vared2_layer
from gatesearch.policies.vared2.cost import channel_counts, st_cost
from gatesearch.policies.vared2.gate import SoftModulationGate, first_open

K = 12


def layer(conv: nn.Module, space_size: int = 2, *, seed: int = 0, spread: float = 1.0) -> DynamicConv:
    """A DynamicConv in eval mode whose gate gives varied decisions (some weights exactly zero)."""
    torch.manual_seed(seed)
    dyn = DynamicConv(conv, space_size=space_size).eval()
    with torch.no_grad():
        dyn.gate.fc2.weight.normal_(0, spread)
        dyn.gate.fc2.bias.uniform_(-0.5, 0.8).div_(dyn.gate.bias_gain)
        dyn.gate.bn.running_mean.normal_(0, 0.1)
    return dyn


def decide(dyn: DynamicConv, v_t: list[float], v_c: list[float]) -> None:
    """Fix the gate's output to V = max(tanh(b), 0) / tanh(β_0) whatever the input: weight 0, bias
    atanh(V·tanh(β_0)) (or -1 for 0)."""
    v = ([] if not dyn.temporal else v_t) + v_c
    unit = dyn.gate.unit
    with torch.no_grad():
        dyn.gate.fc2.weight.zero_()
        dyn.gate.fc2.bias.copy_(torch.tensor([math.atanh(x * unit) if x > 0 else -1.0 for x in v])
                                / dyn.gate.bias_gain)


def model(backbone: str, space_size: int = 2, *, seed: int = 0, width: float = 0.5) -> nn.Module:
    torch.manual_seed(seed)
    return build_policy("vared2", search_space_size=space_size, lambda_e=1.0).apply(
        build(backbone, task="classification", num_classes=K, width=width))


CONVS = {
    "3d_333": lambda: nn.Conv3d(6, 8, 3, padding=1, bias=True),
    "3d_spatial_stride2": lambda: nn.Conv3d(6, 10, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
    "3d_temporal_stride2": lambda: nn.Conv3d(6, 8, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0), bias=False),
    "2d": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "2d_grouped": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=4),
    "2d_depthwise": lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),
}


def x_for(conv: nn.Module, t: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (5, conv.in_channels, t, 9, 9) if isinstance(conv, nn.Conv3d) else (5, conv.in_channels, 9, 9)
    return torch.randn(*shape, generator=g)


# -- equivalence ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("kind", sorted(CONVS))
def test_forced_open_layer_is_the_dense_conv(kind, path):
    """R = 1, r = 1 (the gate forced to compute everything): the layer is the dense conv (≤ 1e-4)."""
    conv = CONVS[kind]()
    dyn = layer(conv, 4)
    dyn.force_open, dyn.path = True, path
    x = x_for(conv)
    with torch.no_grad():
        assert (dyn(x) - conv(x)).abs().max() <= 1e-4
    if path == "sparse":
        assert dyn.density == 1.0 and dyn.gate_macs == 0.0


@pytest.mark.parametrize("space_size", [2, 3, 4])
@pytest.mark.parametrize("kind", sorted(CONVS))
def test_sparse_path_equals_weight_shared_dense_path(kind, space_size):
    """What inference computes (Eq. A.2: one sliced, strided conv) equals the training formula (Eq. 3.5, A.1)."""
    conv = CONVS[kind]()
    x = x_for(conv) * torch.linspace(0.2, 3.0, 5).view(-1, *[1] * (conv.weight.dim() - 1))  # varied inputs
    for seed in range(20):  # a gate whose samples take different decisions (several groups in the sparse path)
        dyn = layer(conv, space_size, seed=seed, spread=3.0)
        with torch.no_grad():
            v_t, v_c = dyn.scores(x)
        if len(set(zip(map(first_open, v_t.tolist()), map(first_open, v_c.tolist())))) > 2:
            break
    else:
        pytest.fail("no seed gives varied decisions")
    with torch.no_grad():
        dyn.path = "dense"
        dense = dyn(x)
        dyn.path = "sparse"
        sparse = dyn(x)
    assert dense.shape == sparse.shape == conv(x).shape
    assert (dense - sparse).abs().max() <= 1e-5 * max(1.0, dense.abs().max().item())  # float32 rounding


def test_sparse_path_computes_only_the_selected_slice(monkeypatch):
    """R = 2, r = 1/2 selected: one conv with C_out/2 filters at twice the temporal stride (Eq. A.2)."""
    conv = nn.Conv3d(4, 8, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0), bias=False)
    dyn = layer(conv, 2)
    decide(dyn, [0.0, 0.5], [0.0, 0.7])
    calls = []
    real = vared2_layer.conv3d
    monkeypatch.setattr(vared2_layer, "conv3d",
                        lambda x, w, b, stride, *a: calls.append((tuple(w.shape), tuple(stride)))
                        or real(x, w, b, stride, *a))
    with torch.no_grad():
        out = dyn(torch.randn(2, 4, 8, 5, 5))
    assert calls == [((4, 4, 3, 1, 1), (4, 1, 1))]
    assert out.shape == (2, 8, 4, 5, 5)


def test_rebuilt_features_are_cheap_linear_maps_of_computed_ones():
    """Eq. 3.1: odd time steps are Φ^t of the step before; Eq. 3.3: channels ≥ k are Φ^c of channel m mod k."""
    conv = nn.Conv3d(3, 8, 3, padding=1, bias=False)
    dyn = layer(conv, 2)
    decide(dyn, [0.0, 0.6], [0.0, 0.8])
    with torch.no_grad():
        dyn.phi_t[0].weight.fill_(2.0)
        dyn.phi_t[0].bias.fill_(0.5)
        dyn.phi_c[0].weight.fill_(-1.0)
        x = torch.randn(1, 3, 6, 4, 4)
        out = dyn(x)
        y = conv(x) * 0.8 * 0.6  # the computed features, weighted by V_c and V_t
    assert torch.allclose(out[:, :4, ::2], y[:, :4, ::2], atol=1e-5)  # computed: channels < 4, even steps
    assert torch.allclose(out[:, 4:, ::2], -out[:, :4, ::2], atol=1e-5)  # Φ^c: -1 × channel m mod 4 (bias 0)
    assert torch.allclose(out[:, :, 1::2], 2.0 * out[:, :, ::2] + 0.5 * 0.6, atol=1e-5)  # Φ^t: 2·Y'[i] + 0.5 (× V_t)


def test_whole_model_keep_all_equals_dense_network():
    """Every layer forced open: the VA-RED² model reproduces the dense model with the same weights."""
    gated = model("r2plus1d_tiny").eval()
    force_open(gated)
    torch.manual_seed(0)
    dense = build("r2plus1d_tiny", task="classification", num_classes=K, width=0.5).eval()
    state = {k.replace(".conv.weight", ".weight"): v for k, v in gated.state_dict().items()}
    dense.load_state_dict(state, strict=False)
    clip = torch.randn(2, 8, 3, 32, 32)
    with torch.inference_mode():
        assert (gated.stream(clip, reset_every=4) - dense.stream(clip, reset_every=4)).abs().max() <= 1e-4


@pytest.mark.parametrize("backbone", ["r2plus1d_tiny", "resnet3d_small", "tiny", "mobilenet_v2_tiny"])
def test_freshly_converted_model_computes_the_dense_network(backbone):
    """Converting starts from the dense network's behaviour, gates not forced (before: every alternative open at
    V ≈ 0.46 and Φ^c copying other channels, top-1 0.600 -> 0.083 at conversion in finding 6): in training (the
    weight-shared dense path, batch statistics) and at inference (the sparse path, running statistics)."""
    torch.manual_seed(0)
    dense = build(backbone, task="classification", num_classes=K, width=0.5)
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    gated = build_policy("vared2", search_space_size=3, lambda_e=1.0).apply(copy.deepcopy(dense))
    clip = torch.randn(3, 8, 3, 32, 32)
    for train in (False, True):
        dense.train(train)
        gated.train(train)
        with torch.no_grad():
            want, got = dense(clip), gated(clip)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with torch.no_grad():
        for layer in dynamic_layers(gated):
            scores = layer.gate.scores_eval(torch.randn(2, layer.conv.in_channels, *([4] if layer.temporal else []),
                                                        6, 6))
            n_t = len(layer.strides) if layer.temporal else 0
            for row in scores:  # the full alternative of each dimension at exactly 1, every cheaper one at 0
                assert first_open(row[:n_t]) == 0 if n_t else True
                assert [round(v, 6) for v in row] == ([1.0] + [0.0] * (n_t - 1) if n_t else []) + \
                    [1.0] + [0.0] * (len(layer.keep) - 1)


def test_closed_alternative_learns_whether_to_open():
    """V = max(·, 0) passes its gradient straight through at 0: at conversion the cheaper alternatives are closed
    (V = 0), yet the task loss reaches their scores, so one can open as the full one closes (the thesis's φ has no
    gradient at 0: they would stay shut, and closing the full conv would leave nothing)."""
    torch.manual_seed(0)
    dyn = DynamicConv(nn.Conv3d(4, 16, (1, 3, 3), padding=(0, 1, 1)), space_size=2).train()
    x = torch.randn(3, 4, 4, 6, 6)
    target = dyn.conv(x).detach() * 2.0  # wants more of the output than the full alternative alone gives
    v_t, v_c = dyn.scores(x)
    assert v_t[:, 1].eq(0).all() and v_c[:, 1].eq(0).all()
    ((dyn(x) - target) ** 2).mean().backward()
    grad = dyn.gate.fc2.bias.grad  # per alternative: temporal (full, stride 2), channel (full, half)
    assert grad[1] != 0 and grad[3] != 0
    assert grad[3] < 0  # opening the half-width alternative adds its channels: the loss falls, so its score rises


@pytest.mark.parametrize("backbone", ["r2plus1d_tiny", "resnet3d_small", "tiny"])
def test_inference_applies_the_next_bn_in_the_pass_that_writes_the_output(backbone):
    """Each gated conv applies the BN after it at inference (rebuilds, V and BN as affine passes over its output);
    the network still computes the training formula (Eq. 3.5, BN applied by the BN), single and mixed alternatives."""
    net = model(backbone, width=0.5 if backbone != "tiny" else 0.25).eval()
    layers = dynamic_layers(net)
    assert sum(layer.bn is not None for layer in layers) >= len(layers) - 1  # the last conv of a network may feed no BN
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight.dim() == 1:
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.5, generator=g)
        for i, dyn in enumerate(layers):
            for p in list(dyn.phi_c.parameters()) + list(dyn.phi_t.parameters()):
                p.normal_(1.0 if p.dim() > 1 or p is dyn.phi_c[0].weight else 0.0, 0.3, generator=g)
            single = i % 3 != 2  # every third layer mixes two alternatives per dimension
            decide(dyn, [0.0, 0.6] if single else [0.4, 0.6], [0.0, 0.8] if single else [0.3, 0.8])
        # one layer whose clips take different ways: one alternative each, mixed, everything closed (zeros)
        rows = torch.tensor([[0.0, 0.6, 0.0, 0.8], [0.4, 0.6, 0.3, 0.8], [-1.0, -1.0, 0.5, 0.5]])
        rows = rows if layers[1].temporal else rows[:, 2:]
        layers[1].gate.forward = lambda x: torch.relu(rows[torch.arange(x.shape[0]) % 3])  # per clip or frame
        layers[1].gate.scores_eval = lambda x: rows[torch.arange(x.shape[0]) % 3].tolist()
    passed = []
    for dyn in layers:
        if dyn.bn is not None:
            dyn.bn.register_forward_hook(lambda m, args, out: passed.append(out is args[0]))
    clip = torch.randn(3, 8, 3, 32, 32, generator=g)
    with torch.no_grad():
        for dyn in layers:
            dyn.path = "dense"
        dense = net(clip)
        for dyn in layers:
            dyn.path = "sparse"
    passed.clear()
    with torch.inference_mode():
        sparse = net(clip)
    assert passed and all(passed)  # every paired BN was applied by its layer
    assert (dense - sparse).abs().max() <= 1e-4 * max(1.0, dense.abs().max().item())


def test_inference_folds_follow_in_place_updates():
    """The gate's FC1·BN fold and the fused maps (rebuilds × BN) are refolded when a parameter or BN statistic
    changes in place: after the change the sparse path still computes the dense path's formula."""
    net = model("r2plus1d_tiny").eval()
    clip = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    layers = [dyn for dyn in dynamic_layers(net) if dyn.bn is not None]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for dyn in layers:  # gates whose decisions depend on the input (so on the gate's BN)
            dyn.gate.fc2.weight.normal_(0, 3.0, generator=g)
            dyn.gate.fc2.bias.uniform_(-0.2, 0.8, generator=g).div_(dyn.gate.bias_gain)
    with torch.inference_mode():
        net(clip)  # folds every layer's gate and maps
    with torch.no_grad():  # what an optimizer step or load_state_dict does: in place
        for dyn in layers:
            dyn.bn.running_mean.add_(0.3)
            dyn.phi_c[0].weight.mul_(-2.0)
            dyn.phi_t[0].bias.add_(0.5)
            dyn.gate.bn.running_var.mul_(4.0)
    with torch.no_grad():
        for dyn in dynamic_layers(net):
            dyn.path = "dense"
        dense = net(clip)
        for dyn in dynamic_layers(net):
            dyn.path = "sparse"
    with torch.inference_mode():
        sparse = net(clip)
    assert (dense - sparse).abs().max() <= 1e-4 * max(1.0, dense.abs().max().item())


# -- the gate (Eq. 3.4) ------------------------------------------------------------------------------

def test_gate_outputs_in_unit_interval_with_exact_zeros():
    gate = SoftModulationGate(6, 4, time_bins=2).eval()
    with torch.no_grad():
        gate.fc2.bias.copy_(torch.tensor([-2.0, 3.0, 0.0, 0.5]) / gate.bias_gain)
        gate.fc2.weight.zero_()
        v = gate(torch.randn(3, 6, 5, 7, 7))
    assert v.shape == (3, 4)
    assert torch.equal(v[:, 0], torch.zeros(3))  # max(tanh(·), 0): a negative score closes the alternative
    assert torch.allclose(v[:, 1], torch.full((3,), math.tanh(3.0) / math.tanh(0.5)))  # β_0 = 0.5 reads as 1
    assert torch.allclose(v[:, 3], torch.ones(3))
    assert ((v >= 0) & (v < 1 / math.tanh(0.5))).all()
    gate.train()
    assert gate(torch.randn(1, 6, 1, 3, 3)).shape == (1, 4)  # a lone clip in training: running BN statistics


def test_channel_counts_halve_and_respect_groups():
    assert channel_counts(nn.Conv3d(4, 16, 1), 4) == (16, 8, 4, 2)
    assert channel_counts(nn.Conv3d(4, 6, 1), 4) == (6, 3, 2, 1)
    assert channel_counts(nn.Conv2d(8, 8, 3, groups=4), 3) == (8, 4, 2)
    assert channel_counts(nn.Conv2d(12, 12, 3, groups=3), 3) == (12, 8, 4)  # whole groups of 4


# -- accounting (Eq. A.2) ----------------------------------------------------------------------------

def test_density_and_gate_macs_match_hand_count():
    conv = nn.Conv3d(4, 8, 3, padding=1, bias=False)
    dyn = layer(conv, 2)
    decide(dyn, [0.0, 0.5], [0.0, 0.5])
    with torch.no_grad():
        dyn(torch.randn(3, 4, 4, 6, 6))
    hw, t = 36, 4
    dense = 8 * 4 * 27 * t * hw
    cost = (4 * 4 * 27 * 2 * hw  # 4 of 8 filters at 2 of 4 steps
            + 4 * 2 * hw + 8 * 2 * hw  # Φ^c rebuilds 4 channels, then one V_c·V_t scaling
            + 8 * 2 * hw)  # Φ^t rebuilds 2 steps
    assert dyn.density == pytest.approx(cost / dense)
    assert cost / dense == pytest.approx(0.25, abs=0.06)  # ≈ r/R (Eq. 3.3)
    gate = 4 * t * hw + (4 * 2) * 16 + 16 * 4  # pooling, FC1 (C_in·bins → D_h), FC2 (D_h → S_t + S_c)
    assert dyn.gate_macs == pytest.approx(gate / 4)  # per video frame


def test_all_closed_layer_outputs_zeros_at_no_cost():
    conv = nn.Conv3d(4, 8, 1, bias=False)
    dyn = layer(conv, 2)
    decide(dyn, [0.5, 0.0], [0.0, 0.0])
    with torch.no_grad():
        out = dyn(torch.randn(2, 4, 4, 3, 3))
    assert torch.equal(out, torch.zeros(2, 8, 4, 3, 3)) and dyn.density == 0.0


def test_mac_counter_reads_clip_model_layers():
    """MacCounter: fvcore's dense count per frame by layer name × measured density + gate MACs."""
    net = model("r2plus1d_tiny").eval()
    clip = torch.randn(2, 8, 3, 32, 32)
    with torch.inference_mode():
        net.stream(clip, reset_every=4)
    counter = MacCounter(net, (3, 32, 32))  # counts one window of 4 frames (the one streamed)
    report = counter.report()
    stem = net.backbone.stem[0]
    assert set(report.layers) == {layer.name for layer in dynamic_layers(net)}
    assert report.layers["backbone.stem.0"].dense == stem.conv_macs((4, 16, 16), stem.conv.out_channels) / 4
    for name, lm in report.layers.items():
        assert lm.density == pytest.approx(net.get_submodule(name).density)
        assert lm.gate > 0
    assert report.effective == pytest.approx(
        report.dense - sum(lm.dense - lm.effective for lm in report.layers.values())
    )


# -- efficiency loss (Eq. 3.6) -----------------------------------------------------------------------

def test_efficiency_loss_hand_value_and_mu0():
    """Every layer at r = 1/2, R = 2: r^s/R^s = 1/4, so L_e = (1/4)² for correct clips and 0 for wrong ones."""
    net = model("r2plus1d_tiny").train()
    for dyn in dynamic_layers(net):
        decide(dyn, [0.0, 0.5], [0.0, 0.5])
    clip = torch.randn(2, 4, 3, 32, 32)
    net(clip)
    correct = torch.tensor([True, False])
    # (1/16 + 0) / 2 (channel counts round)
    assert efficiency_loss(net, correct).item() == pytest.approx(1 / 32, rel=1e-2)
    assert efficiency_loss(net, correct) is None  # records drained
    net(clip)
    assert efficiency_loss(net).item() == pytest.approx(1 / 16, rel=1e-2)  # no labels: every clip counts


def test_efficiency_loss_pushes_only_the_head_to_close():
    """Straight-through (``st_cost``): value = cost of the largest open alternative (the head); the gradient closes
    the head by what closing it saves, and leaves the smaller alternatives (nothing to save) to the task loss."""
    v = torch.tensor([[0.3, 0.6, 0.2], [0.0, 0.5, 0.1], [0.0, 0.0, 0.0]], requires_grad=True)
    cost = st_cost(v, torch.tensor([1.0, 0.5, 0.25]))
    assert cost.tolist() == [1.0, 0.5, 0.0]
    cost.sum().backward()
    assert torch.equal(v.grad, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.25, 0.0], [0.0, 0.0, 0.0]]))


def test_efficiency_loss_hands_the_work_to_a_cheaper_alternative():
    """The defect of a gradient on every open V (finding 6: 3-5 % MORE MACs than dense after fine-tuning): under
    Adam every V closed at the same pace, so no sample ever ran a cheaper alternative; it went from the full conv
    straight to nothing. Minimising L_e alone, the head closes first and the next alternative takes over."""
    torch.manual_seed(0)
    dyn = DynamicConv(nn.Conv3d(8, 32, (1, 3, 3), padding=(0, 1, 1)), space_size=2).train()
    decide(dyn, [1.0, 1.0], [1.0, 1.0])  # every alternative open (a converted layer opens the cheap ones by L_a)
    with torch.no_grad():
        dyn.gate.fc2.weight.normal_(0, 0.01)
    x = torch.randn(4, 8, 4, 6, 6)
    opt = torch.optim.Adam(dyn.gate.parameters(), lr=2e-3)
    handed_over = 0  # steps after which every sample runs the half-width, stride-2 alternative
    for _ in range(60):
        dyn(x)
        (dyn.records[-1].ratio ** 2).mean().backward()  # L_e of a one-layer network (Eq. 3.6, μ0 = 1)
        dyn.records = []
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            v = torch.cat(dyn.scores(x))  # (2N, 2): temporal then channel weights
        handed_over += bool(((v[:, 0] == 0) & (v[:, 1] > 0)).all())
    assert handed_over >= 5  # before: 0 (every alternative closed together, from the full conv to nothing)


def test_policy_loss_uses_correctness_and_lambda():
    net = model("r2plus1d_tiny").train()
    policy = build_policy("vared2", search_space_size=2, lambda_e=0.5)
    clip = torch.randn(2, 4, 3, 32, 32)
    out = net(clip)
    labels = out.argmax(1)
    l_right = policy.loss(net, output=out, batch={"label": labels})
    out = net(clip)
    assert policy.loss(net, output=out, batch={"label": (labels + 1) % K}).item() == 0.0  # μ0 = 0 for every clip
    assert 0 < l_right.item() <= 0.5  # λ_e · (≤ 1)
    assert correct_clips(out, {"label": labels}).tolist() == [True, True]


# -- policy ------------------------------------------------------------------------------------------

def test_policy_declares_its_knobs():
    cls = POLICIES.get("vared2")
    takes = cls.takes()
    assert takes["search_space_size"].default == [2, 3, 4] and takes["lambda_e"].default["log"] is True
    with pytest.raises(ValueError, match="needs 'lambda_e'"):
        build_policy("vared2", search_space_size=2)


def test_refuses_what_it_cannot_gate():
    with pytest.raises(ValueError, match=r"^gate 'vared2' does not support Sequential: ") as e:
        build_policy("vared2", search_space_size=2, lambda_e=1.0).apply(nn.Sequential(nn.Conv3d(3, 4, 1)))
    assert "\n" not in str(e.value)
    net = model("resnet3d_small")
    with pytest.raises(ValueError, match=r"^gate 'vared2' does not support backbone VideoResNet gated already"):
        build_policy("vared2", search_space_size=2, lambda_e=1.0).apply(net)  # already converted


@pytest.mark.parametrize("backbone", ["tiny", "mobilenet_v2_tiny"])
def test_2d_backbones_get_channel_only_gates(backbone):
    """Per-frame 2D backbones (as PSPNet in the thesis): channel alternatives only; streaming = batched."""
    net = model(backbone, 3, width=0.25).eval()
    layers = dynamic_layers(net)
    assert layers and all(not layer.temporal and layer.strides == (1,) and len(layer.keep) == 3 for layer in layers)
    clip = torch.randn(2, 3, 3, 32, 32)
    with torch.inference_mode():
        streamed = net.stream(clip)
        batched = net(clip)
    assert (streamed - batched).abs().max() <= 1e-4


def test_efficiency_loss_closes_gates():
    """Minimising λ_e·L_e (with the task loss) closes costly alternatives: the density of inference falls."""
    net = model("r2plus1d_tiny", width=0.25)
    policy = build_policy("vared2", search_space_size=2, lambda_e=10.0)
    g = torch.Generator().manual_seed(0)
    clip, labels = torch.randn(4, 4, 3, 16, 16, generator=g), torch.arange(4)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)

    def density() -> float:  # MAC-weighted over the layers, from one inference pass
        net.eval()
        for dyn in dynamic_layers(net):
            dyn.reset_stats()
        with torch.inference_mode():
            net(clip)
        net.train()
        return sum(d.stats.cost for d in dynamic_layers(net)) / sum(d.stats.dense for d in dynamic_layers(net))

    before = density()
    for _ in range(6):
        loss = nn.functional.cross_entropy(net(clip), labels) + policy.loss(net)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert density() < 0.6 * before


def test_trial_end_to_end():
    """run_trial with the VA-RED² gate on R(2+1)D-tiny: trains, streams windows, reports MACs and densities."""
    from gatesearch.search.trial import run_trial
    from gatesearch.spaces import DataConfig, EvalConfig, TrialConfig

    cfg = TrialConfig(backbone="r2plus1d_tiny", width=0.25, gate="vared2",
                      knobs={"search_space_size": 2, "lambda_e": 5.0}, epochs=1, batch_size=4, clip_length=4)
    data = DataConfig(train_clips=8, val_clips=4, synthetic={"height": 32, "width": 32})
    out = run_trial(cfg, data, EvalConfig(frames=8, latency_warmup=0, latency_repeats=1))
    m = out.metrics
    assert 0 <= m["quality"] <= 1 and m["latency_ms"] > 0
    dense = build("r2plus1d_tiny", task="classification", num_classes=out.model.fc.out_features, width=0.25)
    dense.window = out.model.window  # a clip net's MACs per frame are counted over the window it streamed
    assert m["dense_macs"] == dense_macs(dense, (3, 32, 32))[0]  # fvcore on the dense network itself
    assert m["macs"] > 0 and m["mean_density"] > 0  # density counts the rebuilds too, so it may pass 1
    assert set(out.layer_density) == {layer.name for layer in dynamic_layers(out.model)}
