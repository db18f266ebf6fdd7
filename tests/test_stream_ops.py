"""Changed-region streaming (ops.changes, policies.stream_ops): layers after block-reference skip-convs redo
only the positions whose inputs changed, and the result is the one the plain layers give."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.backbones import build
from gatesearch.backbones.base import Add, contiguous
from gatesearch.ops import _native, changes
from gatesearch.ops.block_ref import BlockReference
from gatesearch.ops.geometry import resolve_geometry
from gatesearch.policies import build_policy
from gatesearch.policies.skipconv import skip_layers
from gatesearch.policies.stream_ops import StreamAdd, StreamLayer, StreamMaxPool2d, StreamReLU

native = pytest.mark.skipif(not _native.available(), reason="C++ kernels unavailable")


def stream_tensor(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return changes.mark(torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last), None)


def update(t, changed, seed):
    """Change t in place at the positions set in ``changed`` and record it, as a skip-conv does."""
    g = torch.Generator().manual_seed(seed)
    new = torch.randn(t.shape, generator=g)
    t.copy_(torch.where(changed[:, None], new, t))
    return changes.mark(t, changed)


def random_map(n, h, w, p, seed):
    return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) < p


@native
def test_kernels_rewrite_only_changed_positions_and_report_them():
    x, y = stream_tensor(2, 20, 9, 11, seed=1), stream_tensor(2, 20, 9, 11, seed=2)
    mx, my = random_map(2, 9, 11, 0.2, 3), random_map(2, 9, 11, 0.2, 4)
    out = torch.full_like(x, 7.0)
    assert torch.equal(changes.relu_(out, x, mx), mx)
    assert torch.equal(out, torch.where(mx[:, None], x.relu(), torch.full_like(x, 7.0)))
    out = torch.full_like(x, 7.0)
    union = changes.add_(out, x, y, mx, my)
    assert torch.equal(union, mx | my)
    assert torch.equal(out, torch.where(union[:, None], x + y, torch.full_like(x, 7.0)))

    out = torch.full((2, 20, 5, 6), 7.0).contiguous(memory_format=torch.channels_last)
    pooled = changes.max_pool_(out, x, mx, (3, 3), (2, 2), (1, 1))
    expect_map = F.max_pool2d(mx[:, None].float(), 3, 2, 1)[:, 0] > 0  # outputs whose window holds a change
    assert torch.equal(pooled, expect_map)
    assert torch.equal(out, torch.where(expect_map[:, None], F.max_pool2d(x, 3, 2, 1), torch.full_like(out, 7.0)))

    mask = random_map(2, 3, 3, 0.4, 5)
    positions = changes.block_positions(mask, 4, (9, 11))
    assert torch.equal(positions, mask.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :9, :11])


@native
def test_gate_reads_only_halos_with_a_changed_input():
    """A block whose halo holds no changed position is not read: a change there, unannounced, does not fire
    it; announced, it does. Blocks elsewhere are judged as without the map."""
    geom = resolve_geometry((1, 8, 16, 16), (8, 8, 3, 3), stride=1, padding=1, dilation=1, groups=1, block_size=4)
    x = stream_tensor(1, 8, 16, 16)
    ref = BlockReference(x, geom, seen=changes.step(x))
    x[:, :, 1, 1] += 10.0  # block (0, 0) only
    quiet = torch.zeros(1, 16, 16, dtype=torch.bool)
    assert not ref.gate(changes.mark(x, quiet), threshold=1.0).any()
    loud = quiet.clone()
    loud[0, 1, 1] = True
    mask = ref.gate(changes.mark(x, loud), threshold=1.0)
    assert mask[0, 0, 0] and mask.sum() == 1


@native
def test_a_missed_update_or_a_plain_input_means_a_full_pass():
    relu = StreamReLU()
    relu.streaming = True
    x = stream_tensor(1, 4, 6, 6)
    out = relu(x)
    assert changes.is_stream(out) and torch.equal(out, x.relu())
    update(x, random_map(1, 6, 6, 0.3, 1), seed=1)
    update(x, random_map(1, 6, 6, 0.3, 2), seed=2)  # the ReLU misses this frame
    assert torch.equal(relu(x), x.relu()) and changes.since(out, 0) is None  # full pass, says "anything changed"
    plain = torch.randn(1, 4, 6, 6)
    fresh = relu(plain)
    assert fresh is not out and not changes.is_stream(fresh) and torch.equal(fresh, plain.relu())


@native
def test_one_layer_called_on_two_inputs_keeps_an_output_for_each():
    """A ResNet block calls its ReLU twice a frame."""
    relu, add = StreamReLU(), StreamAdd()
    for m in (relu, add):
        m.reset_state()
        m.streaming = True
    a, b = stream_tensor(1, 4, 6, 6, seed=1), stream_tensor(1, 4, 6, 6, seed=2)
    for frame in range(4):
        if frame:
            update(a, random_map(1, 6, 6, 0.3, frame), seed=10 + frame)
            update(b, random_map(1, 6, 6, 0.3, 20 + frame), seed=30 + frame)
        ra = relu(a)
        s = relu(add(ra, b))
        assert torch.equal(ra, a.relu()) and torch.equal(s, (a.relu() + b).relu())
        assert s is not ra


def moving_clip(frames=10, size=48):
    from gatesearch.data import SyntheticConfig, make_clip

    return make_clip(SyntheticConfig(height=size, width=size, frames=frames, seed=3, object_size=0.15,
                                      camera_motion=0.0, noise=0.0), 2,
                     "test")["clip"][None]


@native
@pytest.mark.parametrize("backbone", ["resnet18_tiny", "tiny", "mobilenet_v2_tiny"])
def test_stream_layers_give_what_the_plain_layers_give(backbone):
    """Same outputs and densities with and without the stream layers (block references, ε > 0), while the
    stream layers leave positions untouched and the gates skip reading quiet halos."""
    torch.manual_seed(0)
    model = build_policy("input_norm", threshold=0.05, block_size=4, reference="block", per_value=True).apply(
        build(backbone, task="heatmap", num_classes=3)).eval()
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, StreamLayer):
            m.__class__ = next(c for c in type(m).__mro__ if c in (nn.ReLU, nn.MaxPool2d, Add))
    clip = moving_clip()
    with torch.inference_mode():
        fast, slow = model.stream(clip), plain.stream(clip)
    assert (fast - slow).abs().max().item() <= 1e-6
    assert [layer.density for layer in skip_layers(model)] == [layer.density for layer in skip_layers(plain)]
    assert min(layer.density for layer in skip_layers(model)) < 0.5


def test_block_references_install_the_stream_layers_and_frame_references_do_not():
    def kinds(model):
        return {type(m) for m in model.modules()}

    def model(**knobs):
        torch.manual_seed(0)
        return build_policy("input_norm", threshold=0.1, block_size=4, **knobs).apply(
            build("resnet18_tiny", task="heatmap", num_classes=3)).eval()

    block, frame = model(reference="block"), model()
    assert {StreamReLU, StreamAdd, StreamMaxPool2d} <= kinds(block)
    assert not kinds(frame) & {StreamReLU, StreamAdd, StreamMaxPool2d}
    assert block.state_dict().keys() == frame.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(block.backbone.fine(x), frame.backbone.fine(x))  # outside a stream: plain layers


def test_contiguous_keeps_stream_tensors_as_they_are():
    t = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert contiguous(t).is_contiguous() and contiguous(t) is not t
    changes.mark(t, None)
    assert contiguous(t) is t


@native
def test_skip_conv_outputs_report_their_recomputed_blocks():
    model = build_policy("input_norm", threshold=0.05, block_size=4, reference="block", per_value=True).apply(
        build("resnet18_tiny", task="heatmap", num_classes=3)).eval()
    model.frame_runner = None  # the per-layer stream tensors (a native frame step keeps its maps in C++)
    layer = skip_layers(model)[0]
    clip = moving_clip(frames=3)
    seen = []
    layer.register_forward_hook(lambda m, i, out: seen.append(out._stream))
    with torch.inference_mode():
        model.stream(clip)
    (s0, m0), (s1, m1), (s2, m2) = seen
    assert (s0, m0) == (0, None) and (s1, s2) == (1, 2)  # the reference frame changed everything
    assert 0 < m2.float().mean() < 1 and m2.shape == (1, 24, 24)
