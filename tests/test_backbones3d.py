"""Clip-level backbones (R(2+1)D, 3D ResNet): layouts, kernels, ClipModel, and the contract × the gates that apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.backbones import BACKBONES, ClipBackbone, ClipModel, build
from gatesearch.backbones.clip3d import BatchNorm3d, conv3d
from gatesearch.objectives import dense_macs, task_loss
from gatesearch.policies import build_policy, force_open

B, T, SIZE, K = 2, 4, 32, 12
CLIP_BACKBONES = [n for n in BACKBONES.list() if isinstance(BACKBONES.get(n)(width=0.1), ClipBackbone)]
# the gates that act on clip-level backbones, with their knobs (the skip-conv family gates 2D convs only)
GATES = {"dense": {}, "vared2-S2": {"search_space_size": 2, "lambda_e": 1.0},
         "vared2-S4": {"search_space_size": 4, "lambda_e": 1.0}}


def make(backbone: str, gate: str, *, seed: int = 0, width: float = 0.25) -> ClipModel:
    torch.manual_seed(seed)
    model = build(backbone, task="classification", num_classes=K, width=width)
    return build_policy(gate.split("-")[0], **GATES[gate]).apply(model)


@pytest.fixture(scope="module")
def batch():
    from gatesearch.data import SyntheticConfig, make_clip

    cfg = SyntheticConfig(height=SIZE, width=SIZE, frames=T, seed=3)
    items = [make_clip(cfg, i, "test") for i in range(B)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_registered_clip_backbones():
    assert {"r2plus1d_18", "r2plus1d_tiny", "resnet3d_small"} <= set(CLIP_BACKBONES)
    assert isinstance(build("r2plus1d_tiny", task="classification", num_classes=K), ClipModel)
    with pytest.raises(ValueError,
                       match=r"^backbone VideoResNet does not support task 'heatmap'; it supports classification$"):
        build("r2plus1d_tiny", task="heatmap", num_classes=K)


def test_r2plus1d_18_has_torchvision_layout():
    """torchvision's r2plus1d_18 without its 400-way classifier: 31,505,325 − 205,200 parameters, same names."""
    net = BACKBONES.get("r2plus1d_18")()
    assert sum(p.numel() for p in net.parameters()) == 31_505_325 - 205_200
    names = set(net.state_dict())
    assert {"stem.0.weight", "stem.1.running_mean", "stem.3.weight", "stem.4.bias", "layer1.0.conv1.0.0.weight",
            "layer1.0.conv1.0.1.weight", "layer1.0.conv1.0.3.weight", "layer1.0.conv1.1.weight",
            "layer2.0.downsample.0.weight", "layer4.1.conv2.0.3.weight",
            "layer4.1.conv2.1.num_batches_tracked"} <= names
    assert net.deep_channels == 512


@pytest.mark.parametrize("backbone", CLIP_BACKBONES)
def test_feature_shapes(backbone):
    """Stem halves H, W; stages 2-4 halve T, H, W: (B, C, ceil(T/8), H/16, W/16)."""
    net = BACKBONES.get(backbone)(width=0.25).eval()
    with torch.no_grad():
        out = net.forward_clip(torch.randn(1, 3, 8, 32, 32))
    assert out.shape == (1, net.deep_channels, 1, 2, 2)
    assert net.tasks == ("classification",)


# -- kernels -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kernel", "stride", "padding"), [
    ((1, 3, 3), (1, 2, 2), (0, 1, 1)), ((1, 7, 7), (2, 2, 2), (0, 3, 3)), ((1, 1, 1), (2, 2, 2), (0, 0, 0)),
    ((3, 1, 1), (1, 1, 1), (1, 0, 0)), ((3, 1, 1), (2, 1, 1), (1, 0, 0)), ((5, 1, 1), (4, 1, 1), (2, 0, 0)),
    ((3, 3, 3), (1, 2, 2), (1, 1, 1)),
])
@pytest.mark.parametrize("frames_major", [False, True])
def test_conv3d_kernels_equal_torch(kernel, stride, padding, frames_major):
    """Frames conv, per-tap GEMMs (inference) and one GEMM (autograd) all equal ``F.conv3d``, gradients included."""
    g = torch.Generator().manual_seed(0)
    for t in (1, 4, 5):
        x = (torch.randn(2, t, 6, 9, 9, generator=g).transpose(1, 2) if frames_major
             else torch.randn(2, 6, t, 9, 9, generator=g))
        w, b = torch.randn(5, 6, *kernel, generator=g), torch.randn(5, generator=g)
        ref = F.conv3d(x, w, b, stride, padding)
        with torch.no_grad():
            assert (conv3d(x, w, b, stride, padding, (1, 1, 1)) - ref).abs().max() <= 1e-4
        w.requires_grad_()
        out = conv3d(x, w, b, stride, padding, (1, 1, 1))
        assert (out - ref).abs().max() <= 1e-4
        (grad,) = torch.autograd.grad((out * ref).sum(), w)
        (expected,) = torch.autograd.grad((F.conv3d(x, w, b, stride, padding) * ref).sum(), w)
        assert (grad - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_batchnorm_inference_keeps_layout_and_values():
    bn = BatchNorm3d(6)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 4, 6, 5, 5).transpose(1, 2)  # frames-major (B, C, T, H, W)
    with torch.inference_mode():
        out = bn(x)
    assert out.stride() == x.stride()
    assert torch.allclose(out, F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps),
                          atol=1e-5)


# -- ClipModel -------------------------------------------------------------------------------------

def test_stream_averages_windows(batch):
    model = make("r2plus1d_tiny", "dense").eval()
    clip = torch.cat([batch["clip"], batch["clip"].flip(1)], 1)  # 8 frames
    with torch.inference_mode():
        assert torch.equal(model.stream(clip), model(clip))  # no reset: one window
        halves = (model(clip[:, :4]) + model(clip[:, 4:])) / 2
        assert torch.allclose(model.stream(clip, reset_every=4), halves, atol=1e-6)
        thirds = (3 * model(clip[:, :3]) + 3 * model(clip[:, 3:6]) + 2 * model(clip[:, 6:])) / 8  # by frames covered
        assert torch.allclose(model.stream(clip, reset_every=3), thirds, atol=1e-6)
    assert model.window == 3


class Toy(ClipBackbone):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)  # per frame at 8×8: 4·3·27·64 = 20736 MACs
        self.deep_channels = 4

    def forward_clip(self, x):
        return self.conv(x)


def test_mac_probe_counts_per_frame_of_a_window():
    model = ClipModel(Toy(), task="classification", num_classes=5)
    model.window = 4
    total, per = dense_macs(model, (3, 8, 8))
    assert per["backbone.conv"] == 20736
    assert total == pytest.approx(20736 + 4 * 5 / 4)  # the classifier runs once per 4-frame window


# -- contract: every clip backbone × the gates that apply to it ------------------------------------

CONTRACT = [(b, g) for b in CLIP_BACKBONES for g in sorted(GATES) if g != "vared2-S4" or b == "r2plus1d_tiny"]


@pytest.mark.parametrize(("backbone", "gate"), CONTRACT)
def test_contract(batch, backbone, gate):
    """Shapes, finite values, same seed → same output, every parameter gets a gradient, keep-all = dense.

    Full-depth layouts run on one 2-frame clip (as in ``test_backbones``).
    """
    if "tiny" not in backbone and "small" not in backbone:
        batch = {k: v[:1, :2] if v.dim() > 1 else v[:1] for k, v in batch.items()}
    outs = []
    for _ in range(2):
        model = make(backbone, gate).eval()
        with torch.inference_mode():
            outs.append(model.stream(batch["clip"], reset_every=2))
    assert outs[0].shape == (len(batch["label"]), K) and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])

    model = make(backbone, gate).train()
    policy = build_policy(gate.split("-")[0], **GATES[gate])
    out = model(batch["clip"])
    loss = task_loss("classification", out, batch)
    extra = policy.loss(model, output=out, batch=batch) if gate != "dense" else None
    (loss if extra is None else loss + extra).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:4]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    if gate != "dense":  # forced open, the gated network is the dense one with the same weights
        gated = make(backbone, gate).eval()
        force_open(gated)
        dense = make(backbone, "dense").eval()
        with torch.inference_mode():
            assert (gated(batch["clip"]) - dense(batch["clip"])).abs().max() <= 1e-4


def test_skip_conv_gates_refuse_clip_backbones():
    """The Skip-Conv gates convert per-frame ``Conv2d`` layers: a clip backbone is refused, not silently dense."""
    model = make("r2plus1d_tiny", "dense")
    with pytest.raises(ValueError, match="found no Conv2d"):
        build_policy("input_norm", threshold=1.0, block_size=1).apply(model)


# -- export: the runner's clip-window mode ------------------------------------------------------------

def test_run_stream_in_windows(tmp_path, batch):
    from gatesearch.export import load_artifact, save_artifact, trial_meta
    from gatesearch.export.runner import run_stream
    from gatesearch.export.stream import Stream
    from gatesearch.models import build_model
    from gatesearch.spaces import DataConfig, TrialConfig

    trial = TrialConfig(backbone="r2plus1d_tiny", width=0.25, gate="vared2",
                        knobs={"search_space_size": 2, "lambda_e": 1.0}, clip_length=2)
    model = build_model(trial, K).eval()
    meta = trial_meta(trial, metrics={}, data=DataConfig(), num_classes=K, frame_shape=(3, SIZE, SIZE))
    art = load_artifact(save_artifact(tmp_path / "art", model, meta))
    clip = torch.cat([batch["clip"][0], batch["clip"][1][:1]])  # 5 frames: windows of 2, 2 and 1
    seen = []
    summary = run_stream(Stream(art), iter(clip), on_frame=seen.append)  # windows of the clip length
    assert summary["frames"] == 5 == len(seen) and summary["reset_every"] == 2
    assert [s.index for s in seen] == list(range(5))
    assert seen[0].latency_ms == seen[1].latency_ms  # one window, its time shared by its frames
    assert 0 < summary["macs_per_frame"] and summary["dense_macs_per_frame"] > 0
    with torch.inference_mode():
        expected = int(model.stream(clip[None], reset_every=2).argmax())
    assert summary["predicted_class"] == expected
