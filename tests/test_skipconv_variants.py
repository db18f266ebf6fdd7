"""Every Conv2d variant survives conversion to a skip-conv (issue 3, "Whole-network conversion").

One converted layer is streamed over a 16-frame sequence and compared frame
by frame with (a) the dense conv, for gates that keep everything (norm gate at
ε = 0, Gumbel gate forced open; Eq. 2 is exact), and (b) an independent
masked dense formulation of Eq. 3 for gates that skip.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

from gatesearch.policies.gumbel import GumbelGate
from gatesearch.policies.norm_gates import NormGate
from gatesearch.policies.skipconv import convert_convs, skip_layers, upsample_blocks
from gatesearch.stateful import reset_state, streaming

CI = 4
#: name -> Conv2d keyword arguments (in_channels CI); one per geometry the backbones may contain
VARIANTS = {
    "3x3": dict(out_channels=6, kernel_size=3, padding=1),
    "stride2": dict(out_channels=6, kernel_size=3, stride=2, padding=1),
    "dilation2": dict(out_channels=6, kernel_size=3, padding=2, dilation=2),
    "depthwise": dict(out_channels=CI, kernel_size=3, padding=1, groups=CI),
    "grouped": dict(out_channels=6, kernel_size=3, padding=1, groups=2),
    "1x1": dict(out_channels=6, kernel_size=1),
    "1x1_stride2": dict(out_channels=6, kernel_size=1, stride=2),
    "no_bias": dict(out_channels=6, kernel_size=3, padding=1, bias=False),
    "same": dict(out_channels=6, kernel_size=5, padding="same"),
    "same_dilated": dict(out_channels=6, kernel_size=3, padding="same", dilation=2),
    "valid": dict(out_channels=6, kernel_size=3, padding="valid"),
    "asymmetric": dict(out_channels=6, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1)),
    "stride2_dilation2_depthwise": dict(out_channels=CI, kernel_size=3, stride=2, padding=2, dilation=2, groups=CI),
}
FRAMES, H, W = 16, 15, 13  # odd sizes: partial edge blocks and uneven strides


def sequence(seed=0, noise=0.0):
    """(16, 1, CI, 15, 13): a background (still, or with small per-frame noise) and a moving patch.

    Frame 7 repeats frame 6, so one residual is exactly zero everywhere.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, CI, H, W, generator=g)
    frames = []
    for t in range(FRAMES):
        x = base.clone()
        i, j = t % (H - 4), (2 * t) % (W - 4)
        x[..., i : i + 4, j : j + 4] += torch.randn(1, CI, 4, 4, generator=g)
        x += noise * torch.randn(1, CI, H, W, generator=g)
        frames.append(x)
    frames[7] = frames[6].clone()  # nothing changes: everything may be skipped
    return torch.stack(frames)


def make_gate(kind):
    if kind == "norm":
        return lambda conv: NormGate(0.0, output_norm=False)
    if kind == "gumbel":
        def gate(conv):
            g = GumbelGate(conv)
            g.force_open = True
            return g
        return gate
    raise ValueError(kind)


def converted(variant, make, block_size):
    torch.manual_seed(0)
    conv = nn.Conv2d(CI, **VARIANTS[variant])
    dense = copy.deepcopy(conv).eval()
    model = nn.Sequential(conv)
    convert_convs(model, make, block_size=block_size)
    return model.eval(), dense


def stream(model, xs, path):
    for layer in skip_layers(model):
        layer.path = path
    outs = []
    with torch.no_grad(), streaming(model):
        for x in xs:
            outs.append(model(x).clone())  # the output is the layer's state: copy it
    return torch.stack(outs)


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("gate", ["norm", "gumbel"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keep_everything_equals_dense_conv(variant, gate, block_size, path):
    """Eq. 2: with every position kept, accumulated residuals equal the dense conv on every frame."""
    model, dense = converted(variant, make_gate(gate), block_size)
    xs = sequence()
    got = stream(model, xs, path)
    with torch.no_grad():
        want = torch.stack([dense(x) for x in xs])
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def input_norm_mask(r, conv, threshold, b):
    """Independent Eq. 5: l1 norm of r over each (dilated) kernel support, > ε, max-pooled b."""
    a = r.abs().sum(1, keepdim=True)  # (N, 1, H, W)
    ones = a.new_ones(1, 1, *conv.kernel_size)
    score = F.conv2d(a, ones, None, conv.stride, conv.padding, conv.dilation)  # (N, 1, Ho, Wo)
    active = (score > threshold).float()
    return F.max_pool2d(active, b, b, ceil_mode=True).squeeze(1) > 0 if b > 1 else active.squeeze(1) > 0


def gumbel_mask(r, conv, gate, b):
    """Independent Eq. 8 at inference: round(σ(f)) = f > 0, f a 1-channel conv on |r| with the layer's geometry."""
    bias = gate.bias * gate.settings.bias_gain
    f = F.conv2d(r.abs(), gate.weight, bias, conv.stride, conv.padding, conv.dilation)  # (N, 1, Ho, Wo)
    active = (f > 0).float()
    return F.max_pool2d(active, b, b, ceil_mode=True).squeeze(1) > 0 if b > 1 else active.squeeze(1) > 0


def eq3_reference(conv, xs, mask_fn, b):
    """z_1 = w * x_1 + bias; z_t = z_{t-1} + up_b(mask(r_t)) ⊙ (w * r_t), no bias on residuals."""
    outs = [conv(xs[0])]
    for t in range(1, len(xs)):
        r = xs[t] - xs[t - 1]
        res = F.conv2d(r, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        mask = upsample_blocks(mask_fn(r).to(res.dtype), b, res.shape[-2:])  # (N, 1, Ho, Wo)
        outs.append(outs[-1] + mask * res)
    return torch.stack(outs)


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("gate", ["norm", "gumbel"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_skipping_gate_equals_masked_dense_formulation(variant, gate, block_size, path):
    """Eq. 3 with a gate that really skips: the stream equals an independent masked dense computation."""
    if gate == "norm":
        threshold = 3.0
        model, dense = converted(variant, lambda conv: NormGate(threshold, output_norm=False), block_size)
        conv = skip_layers(model)[0].conv  # explicit padding
        mask_fn = lambda r: input_norm_mask(r, conv, threshold, block_size)
    else:
        model, dense = converted(variant, GumbelGate, block_size)
        layer = skip_layers(model)[0]
        with torch.no_grad():
            # f = w * |r| - 3 with weights about the fresh gate's 1 (the Input-Norm scale) but not all equal:
            # background residuals (noise) stay closed, the moving patch opens some
            layer.gate.weight.copy_(torch.linspace(0.5, 1.5, layer.gate.weight.numel()).view_as(layer.gate.weight))
            layer.gate.bias.fill_(-3.0 / layer.gate.settings.bias_gain)
        conv = layer.conv
        mask_fn = lambda r: gumbel_mask(r, conv, layer.gate, block_size)
    xs = sequence(seed=1, noise=0.02)  # small residuals everywhere: the gate must skip non-zero ones
    got = stream(model, xs, path)
    with torch.no_grad():
        want = eq3_reference(conv, xs, mask_fn, block_size)
        full = torch.stack([dense(x) for x in xs])
    assert (got - want).abs().max().item() <= 1e-4
    density = skip_layers(model)[0].density
    assert 0.0 < density < 1.0, "the gate should skip some positions and keep others"
    assert (got[1:] - full[1:]).abs().max().item() > 1e-3, "skipping must change the output"


@pytest.mark.parametrize("gate", ["norm", "gumbel"])
def test_conv_bn_relu_stack_streams_exactly(gate):
    """BN (eval: affine per channel) and ReLU act on the accumulated output; each conv forms its own residual."""
    torch.manual_seed(0)
    stack = randomize_bn(nn.Sequential(
        nn.Conv2d(CI, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
    ), scale=0.3).eval()
    dense = copy.deepcopy(stack)
    convert_convs(stack, make_gate(gate), block_size=2)
    assert len(skip_layers(stack)) == 3
    xs = sequence(seed=2)
    got = stream(stack, xs, "auto")
    with torch.no_grad():
        want = torch.stack([dense(x) for x in xs])
    assert (got - want).abs().max().item() <= 1e-4


def test_reference_frame_every_t_test():
    """T_test (Table 4): the reference frame is recomputed densely every T_test frames, or only once."""
    model, dense = converted("3x3", lambda conv: NormGate(1e9, output_norm=False), 1)
    layer = skip_layers(model)[0]
    xs = sequence(seed=3)
    for t_test, refs in [(4, (0, 4, 8, 12)), (None, (0,)), (16, (0,)), (5, (0, 5, 10, 15))]:
        layer.reset_stats()
        outs = []
        with torch.no_grad(), streaming(model):
            for t, x in enumerate(xs):
                if t_test and t and t % t_test == 0:
                    reset_state(model)
                outs.append(model(x).clone())
        for t, out in enumerate(outs):  # everything skipped: each frame repeats its reference
            ref = max(r for r in refs if r <= t)
            assert torch.allclose(out, dense(xs[ref]), atol=1e-5)
        assert layer.density == pytest.approx(len(refs) / FRAMES)
