"""Backbones: which gates they take, full-size layouts, the temporal shift, and loading weights.

What every gate must do on every backbone it takes is ``test_contract.py``; here each registered backbone is
checked against the gates' declared needs, and at full width for feature shapes and torchvision compatibility.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn
from gate_contract import WIDTH, accepted_gates, batched, gated_model, make_batch, tasks_of
from torch import nn

from gatesearch.backbones import BACKBONES, ClipBackbone, WeightsError, build, clip_length, load_weights
from gatesearch.backbones.temporal_shift import TemporalShift
from gatesearch.policies import POLICIES, build_policy
from gatesearch.stateful import streaming

B, T, K = 2, 4, 12


@pytest.fixture(scope="module")
def batch():
    return make_batch(clips=B, frames=T)


@pytest.mark.parametrize("backbone", BACKBONES.list())
def test_gates_refuse_exactly_what_they_declare(backbone):
    """``apply`` refuses a backbone, with one line naming the gate, exactly when the backbone lacks the structure
    the gate declares it needs (``requires``): the search space refuses such pairs from the declaration alone
    (``spaces.compat``), and the contract suite runs exactly the pairs the declarations accept."""
    from gatesearch.spaces.compat import incompatibility

    task = tasks_of(backbone)[0]
    for gate in POLICIES.list():
        why = incompatibility(backbone, gate, task)
        assert (why is None) == (gate in accepted_gates(backbone)), (gate, why)
        model = build(backbone, task=task, num_classes=K, width=WIDTH)
        try:
            build_policy(gate, **POLICIES.get(gate).example_knobs()).apply(model)
        except ValueError as err:
            assert why is not None, f"{gate} declares it can convert {backbone}, but apply refused: {err}"
            assert "\n" not in str(err) and ("gate" in str(err) or "Skip-Conv" in str(err)), str(err)
        else:
            assert why is None, f"{gate} declares it cannot convert {backbone} ({why}), but apply took it"


# -- full-size layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", BACKBONES.list())
def test_full_width_feature_shapes(backbone):
    """At width 1: per-frame nets give fine at stride 4 with ``fine_channels`` and deep with
    ``deep_channels``; clip nets give ``deep_channels`` from a clip."""
    net = BACKBONES.get(backbone)().eval()
    assert net.tasks and set(net.tasks) <= {"classification", "heatmap"}
    with torch.inference_mode():
        if isinstance(net, ClipBackbone):
            deep = net.forward_clip(torch.randn(1, 3, 4, 64, 64))  # (B, 3, T, H, W)
            assert deep.shape[:2] == (1, net.deep_channels)
            return
        fine = net.fine(torch.randn(1, 3, 64, 64))
        deep = net.deep(fine)
    assert fine.shape == (1, net.fine_channels, 16, 16)
    assert deep.shape[:2] == (1, net.deep_channels) and deep.shape[-1] <= 16


@pytest.mark.parametrize(("backbone", "params", "keys"), [
    # torchvision's counts without the classifier (fc / classifier: 1000-way head)
    ("resnet18", 11_689_512 - 513_000, 122 - 2),
    ("resnet34", 21_797_672 - 513_000, 218 - 2),
    ("resnet50", 25_557_032 - 2_049_000, 320 - 2),
    ("mobilenet_v2", 3_504_872 - 1_281_000, 314 - 2),
])
def test_torchvision_layouts(backbone, params, keys):
    """Same parameter count and state-dict size as torchvision, under torchvision's names."""
    net = BACKBONES.get(backbone)()
    assert sum(p.numel() for p in net.parameters()) == params
    names = net.state_dict()
    assert len(names) == keys
    expected = {
        "resnet18": ["conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
                     "layer4.1.bn2.num_batches_tracked"],
        "resnet34": ["layer3.5.conv2.weight", "layer4.0.downsample.1.bias"],
        "resnet50": ["layer1.0.conv3.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.weight"],
        "mobilenet_v2": ["features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                         "features.2.conv.1.0.weight", "features.17.conv.3.running_mean", "features.18.1.weight"],
    }[backbone]
    assert set(expected) <= set(names)


# -- temporal shift ------------------------------------------------------------------------------

def test_temporal_shift_is_online_and_batched_equals_streamed():
    """The first C/8 channels come from the previous frame (zeros at frame 0); the rest stay."""
    shift = TemporalShift(16)
    x = torch.randn(2, 5, 16, 3, 3)  # (B, T, C, H, W)
    with clip_length(shift, 5):
        batched = shift(x.flatten(0, 1)).unflatten(0, (2, 5))
    assert shift.frames_per_clip is None  # restored after the block
    assert torch.equal(batched[:, 0, :2], torch.zeros(2, 2, 3, 3))
    assert torch.equal(batched[:, 1:, :2], x[:, :-1, :2])
    assert torch.equal(batched[:, :, 2:], x[:, :, 2:])
    with streaming(shift):
        streamed = torch.stack([shift(x[:, t]) for t in range(5)], 1)
    assert torch.equal(streamed, batched)


def test_temporal_shift_reset_one_frame_and_unknown_clip_length():
    shift = TemporalShift(8)
    x = torch.randn(3, 8, 2, 2)
    assert torch.equal(shift(x[:1])[:, :1], torch.zeros(1, 1, 2, 2))  # one frame, no clip length: a first frame
    with pytest.raises(ValueError, match="a batch of 3 frames but no clip length"):
        shift(x)
    with streaming(shift):
        shift(x)
        shift.reset_state()
        assert torch.equal(shift(x)[:, :1], torch.zeros(3, 1, 2, 2))
    with clip_length(shift, 2), pytest.raises(ValueError, match="not a whole number of 2-frame clips"):
        shift(x)


def test_tsm_stream_resets_like_clips(batch):
    """Streaming with a reset every 2 frames equals the batched net over 2-frame clips."""
    model = randomize_bn(gated_model("tsm_resnet18_tiny", "dense", "heatmap"), batch["clip"]).eval()
    clip = batch["clip"]
    with torch.inference_mode():
        streamed = model.stream(clip, reset_every=2)
        halves = batched(model, clip.reshape(B * 2, 2, *clip.shape[2:])).reshape(B, T, *streamed.shape[2:])
        whole = batched(model, clip)
    assert (streamed - halves).abs().max() <= 1e-4
    assert (streamed - whole).abs().max() > 1e-3  # the shift really carries the previous frame


def test_video_model_tells_the_shift_the_clip_length(batch):
    """``VideoModel.forward`` opens ``clip_length`` around its batched pass (no help from the caller)."""
    model = gated_model("tsm_resnet18_tiny", "dense", "heatmap").eval()
    seen = []
    shift = next(m for m in model.modules() if isinstance(m, TemporalShift))
    shift.register_forward_pre_hook(lambda m, args: seen.append(m.frames_per_clip))
    with torch.inference_mode():
        model(batch["clip"])
    assert seen == [T]


# -- load_weights ----------------------------------------------------------------------------------

def _save(state: dict, path, fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_load_weights_round_trip(tmp_path, fmt):
    src = BACKBONES.get("resnet18_tiny")()
    randomize_bn(src)
    path = tmp_path / f"w.{fmt}"
    _save(src.state_dict(), path, fmt)
    dst = build("resnet18_tiny", task="classification", num_classes=K)  # a VideoModel: backbone keys only
    head = dst.clip_head.fc.weight.clone()
    assert load_weights(dst, path) == ([], [])
    for k, v in src.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k
    assert torch.equal(dst.clip_head.fc.weight, head)


def test_load_weights_checkpoint_wrapper_and_prefix_map(tmp_path):
    src = build("tiny", task="heatmap", num_classes=K)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = build("tiny", task="heatmap", num_classes=K)
    load_weights(dst, path, prefix_map={"module.": ""})
    assert torch.equal(dst.heat_head.weight, src.heat_head.weight)
    # a torchvision-style file with a classifier: drop it by prefix
    state = {**BACKBONES.get("resnet18_tiny")().state_dict(), "fc.weight": torch.zeros(10, 128)}
    torch.save(state, tmp_path / "tv.pt")
    with pytest.raises(WeightsError, match=r"unexpected 1 key \(fc.weight\)"):
        load_weights(BACKBONES.get("resnet18_tiny")(), tmp_path / "tv.pt")
    load_weights(BACKBONES.get("resnet18_tiny")(), tmp_path / "tv.pt", prefix_map={"fc.": None})


def test_load_weights_mismatch_names_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    _save(BACKBONES.get("tiny")().state_dict(), path, "safetensors")
    with pytest.raises(WeightsError) as e:
        load_weights(BACKBONES.get("resnet18_tiny")(), path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "missing" in msg and "conv1.weight" in msg and "unexpected" in msg and "stage1.0.0.weight" in msg
    with pytest.raises(WeightsError, match="no key in common"):
        load_weights(BACKBONES.get("resnet18_tiny")(), path, strict=False)
    _save(BACKBONES.get("tiny")(width=2.0).state_dict(), path, "safetensors")
    with pytest.raises(WeightsError, match=r"shape of stem.0.weight is \(32, 3, 3, 3\) in the file, \(16, 3, 3, 3\)"):
        load_weights(BACKBONES.get("tiny")(), path)


def test_load_weights_missing_unreadable_or_unsafe_file(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pt"):
        load_weights(BACKBONES.get("tiny")(), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file .*junk.pt"):
        load_weights(BACKBONES.get("tiny")(), tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(WeightsError, match="cannot read weights file .*junk.safetensors"):
        load_weights(BACKBONES.get("tiny")(), tmp_path / "junk.safetensors")
    torch.save({"w": torch.zeros(1), "hook": nn.ReLU()}, tmp_path / "pickled.pt")  # weights_only refuses modules
    with pytest.raises(WeightsError, match="cannot read weights file .*pickled.pt"):
        load_weights(BACKBONES.get("tiny")(), tmp_path / "pickled.pt")


@pytest.mark.usefixtures("quick_crossover")
def test_load_weights_into_a_gated_model_and_no_partial_load(tmp_path, batch):
    """Dense weights load into a gated model (its layers accept dense names); a refused file changes nothing."""
    dense = randomize_bn(build("resnet18_tiny", task="heatmap", num_classes=K), batch["clip"]).eval()
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    gated = build_policy("input_norm", threshold=0.0, block_size=2).apply(
        build("resnet18_tiny", task="heatmap", num_classes=K)).eval()
    load_weights(gated, tmp_path / "dense.pt")
    with torch.inference_mode():
        assert torch.allclose(gated.stream(batch["clip"]), dense(batch["clip"]), atol=1e-4)
    state = dict(dense.state_dict(), extra=torch.zeros(1))
    state = {k: (v + 1 if k == "backbone.conv1.weight" else v) for k, v in state.items()}
    torch.save(state, tmp_path / "extra.pt")
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    with pytest.raises(WeightsError, match=r"unexpected 1 key \(extra\)"):
        load_weights(gated, tmp_path / "extra.pt")
    assert all(torch.equal(v, before[k]) for k, v in gated.state_dict().items())
