"""Skip-Convolutions on a whole network: equivalence, structure, accounting."""

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from gatesearch.backbones import BACKBONES, ClipBackbone, build
from gatesearch.policies import build_policy
from gatesearch.policies.skipconv import skip_layers
from gatesearch.stateful import streaming


def gated(backbone, gate, task="heatmap", **knobs):
    torch.manual_seed(0)
    model = randomize_bn(build(backbone, task=task, num_classes=12))
    return build_policy(gate, **knobs).apply(model).eval()


@pytest.mark.parametrize("backbone", ["tiny"])  # every backbone: tests/test_backbones.py
@pytest.mark.parametrize("gate", ["input_norm", "output_norm"])
@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
def test_zero_threshold_reproduces_dense(static_clip, backbone, gate, block_size, path):
    """ε = 0 skips only exactly-zero residual supports: frame by frame equal to the dense net."""
    model = gated(backbone, gate, threshold=0.0, block_size=block_size)
    for layer in skip_layers(model):
        layer.path = path
    with torch.inference_mode():
        dense = model(static_clip)  # not streaming: plain convs, frames as a batch
        streamed = model.stream(static_clip)  # 16 frames, reference only at frame 0
    assert streamed.shape == dense.shape == (1, 16, 1, 8, 8)
    assert (streamed - dense).abs().max().item() <= 1e-4
    densities = [layer.density for layer in skip_layers(model)]
    assert min(densities) < 1.0, "a still background must let some layer skip"


SEARCH_SIZE_2D = [n for n in BACKBONES.list() if ("tiny" in n or "small" in n) and not isinstance(
    BACKBONES.get(n)(width=0.25), ClipBackbone)]


@pytest.mark.parametrize("backbone", SEARCH_SIZE_2D)
@pytest.mark.parametrize("gate", ["input_norm", "output_norm", "gumbel"])
def test_keep_everything_over_16_frames_every_backbone(backbone, gate):
    """Issue 3 bar: a gate that keeps everything reproduces the dense net frame by frame over 16 frames."""
    from gatesearch.data import SyntheticConfig, make_clip
    from gatesearch.policies import force_open

    clip = make_clip(SyntheticConfig(height=32, width=32, frames=16, seed=2), 1, "test")["clip"][None]
    knobs = {"threshold": 0.0} if gate != "gumbel" else {"beta": 1.0}
    model = gated(backbone, gate, task="heatmap", block_size=2, **knobs)
    force_open(model)
    for layer in skip_layers(model):
        layer.path = "sparse"  # the skipping kernels themselves, without a timed crossover calibration per shape
    with torch.inference_mode():
        dense = model(clip)
        streamed = model.stream(clip)
    scale = max(1.0, dense.abs().max().item())
    assert (streamed - dense).abs().max().item() <= 1e-4 * scale


def test_zero_threshold_classification_logits(static_clip):
    model = gated("tiny", "input_norm", task="classification", threshold=0.0, block_size=4)
    with torch.inference_mode():
        assert torch.allclose(model.stream(static_clip), model(static_clip), atol=1e-4)


def test_large_threshold_skips_and_resets(static_clip):
    model = gated("tiny", "input_norm", threshold=1e9, block_size=2)
    with torch.inference_mode():
        out = model.stream(static_clip, reset_every=4)
        dense = model(static_clip)
    # frames 0, 4, 8, 12 are reference frames: exact; the others repeat their reference
    for t in (0, 4, 8, 12):
        assert torch.allclose(out[:, t], dense[:, t], atol=1e-4)
    assert torch.equal(out[:, 1], out[:, 0])
    used = [layer for layer in skip_layers(model) if layer.frames]  # the heatmap task does not run the deep stage
    assert len(used) == 4 and all(abs(layer.density - 4 / 16) < 1e-6 for layer in used)


def test_mask_is_block_structured(static_clip):
    from gatesearch.ops import upsample_block_mask

    model = gated("tiny", "input_norm", threshold=0.5, block_size=4)
    model.frame_runner = None  # the per-layer path, whose gate plan the spy wraps
    layer = skip_layers(model)[0]
    masks = []
    orig = layer.gate.plan

    def spy(*args):  # the mask each frame's step gets
        frame_mask = orig(*args)

        def spied(x, x_prev):
            m, r = frame_mask(x, x_prev)
            masks.append(upsample_block_mask(m, 4, (16, 16)))
            return m, r

        return spied

    layer.gate.plan = spy
    with torch.inference_mode():
        model.stream(static_clip)
    assert masks
    for m in masks:  # (N, 1, 16, 16): constant on every 4×4 block
        blocks = m.reshape(1, 4, 4, 4, 4).float()
        assert torch.equal(blocks.amax((2, 4)), blocks.amin((2, 4)))


def test_every_conv_converted_and_inplace_activations_disabled():
    model = gated("tiny", "input_norm", threshold=0.0, block_size=1)
    inner = {id(layer.conv) for layer in skip_layers(model)}
    assert inner and all(id(m) in inner for m in model.modules() if type(m) is nn.Conv2d)
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_streaming_context_restores_plain_mode(static_clip):
    model = gated("tiny", "output_norm", threshold=0.3, block_size=2)
    model.frame_runner = None  # the layers' own state (the native frame step: tests/test_frame_step.py)
    with torch.inference_mode(), streaming(model):
        model.frame(static_clip[:, 0])
        assert skip_layers(model)[0].x_prev is not None
    assert all(not layer.streaming and layer.x_prev is None for layer in skip_layers(model))


def test_first_frame_dense_then_gradient_flows_through_stream(static_clip):
    """Training through the stream (out of place) reaches the conv weights."""
    model = gated("tiny", "input_norm", task="classification", threshold=0.1, block_size=1).train()
    out = model.stream(static_clip[:, :4])
    out.sum().backward()
    assert all(layer.conv.weight.grad is not None for layer in skip_layers(model))


def test_dense_weights_load_into_the_gated_network(static_clip):
    dense = randomize_bn(build("tiny", task="heatmap", num_classes=12)).eval()
    model = gated("tiny", "input_norm", threshold=0.0, block_size=2)
    model.load_state_dict(dense.state_dict())
    with torch.inference_mode():
        assert torch.allclose(model.stream(static_clip), dense(static_clip), atol=1e-4)


@pytest.mark.parametrize("backbone", ["resnet18_tiny", "mobilenet_v2_tiny", "hrnet_small"])
def test_batch_norm_folds_into_the_skip_conv_while_streaming(backbone):
    """Every conv→BN pair is found; streaming in eval mode skips the BN pass (its map rides in the conv's
    weights and state) and still equals the batched net; train mode and batched passes run the BN itself."""
    from gatesearch.data import SyntheticConfig, make_clip
    from gatesearch.policies.skipconv import FoldedBatchNorm2d

    clip = make_clip(SyntheticConfig(height=32, width=32, frames=6, seed=2), 1, "test")["clip"][None]
    model = gated(backbone, "input_norm", task="heatmap", threshold=0.0, block_size=2)
    model.frame_runner = None  # the BN modules' own calls (a native frame step folds them without calling them)
    folded = [m for m in model.modules() if isinstance(m, FoldedBatchNorm2d)]
    plain = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    assert folded and not plain, f"{len(plain)} BatchNorm2d left unpaired"
    assert all(m.source.bn is m for m in folded)
    calls = []
    for m in folded:
        m.register_forward_hook(lambda mod, args, out: calls.append(out is args[0]))
    for layer in skip_layers(model):
        layer.path = "sparse"
    with torch.inference_mode():
        dense = model(clip)
        assert calls and not any(calls)  # batched: every BN computes
        calls.clear()
        streamed = model.stream(clip)
    assert calls and all(calls)  # streamed in eval mode: every BN passes its input through
    assert (streamed - dense).abs().max().item() <= 1e-4 * max(1.0, dense.abs().max().item())
    calls.clear()
    model.train().stream(clip[:, :2])
    assert calls and not any(calls)  # training statistics cannot be folded


# ---------------------------------------------------------------------------
# reference="block": residuals against each block's last computed input
# ---------------------------------------------------------------------------


def _moving_clip(frames=12, size=40):
    """A textured still background with a small patch drifting one pixel per frame (slow, sub-threshold
    changes per frame: what Eq. 3 loses and the block reference accumulates)."""
    from gatesearch.data import SyntheticConfig, make_clip

    return make_clip(SyntheticConfig(height=size, width=size, frames=frames, seed=3, camera_motion=0.0, noise=0.0),
                     2, "test")["clip"][None]


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("backbone", ["tiny", "resnet18_tiny", "mobilenet_v2_tiny", "hrnet_small"])
@pytest.mark.parametrize("path", ["sparse", "auto"])
def test_block_reference_keeps_everything_and_matches_masked_dense(backend, backbone, path):
    """ε = 0 reproduces the dense net; at ε > 0 the skipping kernels equal the masked dense formulation
    (z[active] = conv(x)[active]) frame by frame, on the C++ kernels and on the PyTorch fallback."""
    from gatesearch.ops import _native

    if backend == "native" and not _native.available():
        pytest.skip("C++ kernels unavailable")
    clip = _moving_clip()
    with (_native.disabled() if backend == "torch" else torch.inference_mode()), torch.inference_mode():
        for threshold in (0.0, 0.05):
            model = gated(backbone, "input_norm", threshold=threshold, block_size=4, reference="block", per_value=True)
            for layer in skip_layers(model):
                layer.path = path
            fast = model.stream(clip)
            for layer in skip_layers(model):
                layer.path = "dense"
            masked = model.stream(clip)
            assert (fast - masked).abs().max().item() <= 1e-4
            if threshold == 0.0:
                assert (fast - model(clip)).abs().max().item() <= 1e-4
            else:
                assert min(layer.density for layer in skip_layers(model)) < 0.5, "ε > 0 must skip"


def test_block_reference_bounds_the_drift_that_eq3_accumulates():
    """A slow ramp, below ε per frame: Eq. 3 (reference="frame") drops it every frame and the output drifts
    without bound; the block reference accumulates it until the gate fires, so the error stays bounded."""
    from gatesearch.policies.norm_gates import NormGate
    from gatesearch.policies.skipconv import SkipConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x0, step = torch.randn(1, 4, 12, 12), torch.full((1, 4, 12, 12), 0.02)  # per frame: 36 * 0.02 = 0.72 < ε
    errors = {}
    for reference in ("frame", "block"):
        layer = SkipConv2d(nn.Conv2d(4, 6, 3, padding=1), NormGate(1.0, output_norm=False), block_size=2,
                           reference=reference).eval()
        layer.conv.load_state_dict(conv.state_dict())
        with torch.inference_mode(), streaming(layer):
            for t in range(40):
                out = layer(x0 + t * step).clone()
            errors[reference] = (out - conv(x0 + 39 * step)).abs().max().item()
    bound = (1.0 + 0.72) * conv.weight.abs().amax().item()  # one window's pending change: at most ε plus a step
    assert errors["block"] <= bound < errors["frame"], errors


def test_per_value_threshold_scales_with_the_support():
    model = gated("tiny", "input_norm", threshold=0.1, block_size=2, per_value=True)
    for layer in skip_layers(model):
        c = layer.conv
        assert layer.gate._args(layer)["threshold"] == pytest.approx(
            0.1 * c.in_channels * c.kernel_size[0] * c.kernel_size[1]
        )


def test_output_norm_threshold_means_the_same_for_a_one_channel_head_and_a_wide_layer():
    """One ε for every layer (Eq. 7) must mean the same in each: a layer made of C copies of one filter changes
    each output channel as much as that filter does, so it keeps the same positions. Summed over C_out, the bound
    grew with the width, and a 1-channel heatmap head froze while the rest computed (docs/fidelity.md, finding 2:
    PCK 0.971 -> 0.621 at 7 % of the MACs skipped)."""
    from gatesearch.policies.norm_gates import NormGate
    from gatesearch.policies.skipconv import SkipConv2d

    torch.manual_seed(0)
    head = nn.Conv2d(16, 1, 3, padding=1)
    wide = nn.Conv2d(16, 64, 3, padding=1)
    with torch.no_grad():
        wide.weight.copy_(head.weight.repeat(64, 1, 1, 1))
    r = torch.randn(2, 16, 12, 12) * torch.rand(2, 1, 12, 12)  # changes of every size
    support = nn.functional.conv2d(r.abs().sum(1, keepdim=True), torch.ones(1, 1, 3, 3), padding=1)  # ‖r‖₁
    eps = 0.5 * float(head.weight.abs().sum() * support.max())  # halfway up the head's scores
    got = {name: SkipConv2d(conv, NormGate(eps, output_norm=True), block_size=1) for name, conv in
           (("head", head), ("wide", wide))}
    got = {name: layer.gate.block_mask(r, layer) for name, layer in got.items()}
    assert 0 < got["head"].float().mean() < 1
    assert torch.equal(got["head"], got["wide"])


def test_bad_reference_options_fail_with_one_line():
    with pytest.raises(ValueError, match="^gate 'input_norm': reference: 'last' is not one of frame, block$"):
        gated("tiny", "input_norm", threshold=0.1, block_size=2, reference="last")
    with pytest.raises(ValueError, match="^gate 'input_norm': per_value: expected true or false, got 'yes'$"):
        gated("tiny", "input_norm", threshold=0.1, block_size=2, per_value="yes")
    with pytest.raises(ValueError, match="does not take 'reference'"):
        build_policy("gumbel", beta=1.0, block_size=2, reference="block")
