"""D-STEP gate (D-STEP, Section 3): block protocol, Eq. 1 merge, Eq. 2 accounting, Eq. 3 loss and schedule,
the inference kernels against the masked dense reference, dense equivalence, and controllability."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import mixed_decisions, randomize_bn
from torch import nn

from gatesearch.backbones import build
from gatesearch.backbones.resnet import BasicBlock, Bottleneck
from gatesearch.objectives import reset_stats
from gatesearch.ops.channel_gather import FoldedConv, tile_conv
from gatesearch.policies import POLICIES, build_policy
from gatesearch.policies.dstep import (
    DStep,
    DStepBlock,
    DStepSettings,
    convert_blocks,
    decisions,
    dstep_blocks,
    flops_ratio,
    set_gating,
)
from gatesearch.policies.dstep.block import residual_pairs
from gatesearch.policies.dstep.nets import COMPUTE, REUSE, SKIP
from gatesearch.policies.dstep.tiles import tile_sums, upsample_tiles
from gatesearch.stateful import streaming

pytestmark = pytest.mark.usefixtures("quick_crossover")


@pytest.fixture(autouse=True)
def one_thread():
    """Streaming runs many small ops: on a shared 2-core machine two threads spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stream_block(block: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """Frames (T, N, C, H, W) through one block while streaming -> (T, N, ...)."""
    with streaming(block):
        return torch.stack([block(frame) for frame in clip])


BLOCKS = {
    "basic_stride2": lambda: BasicBlock(8, 16, stride=2),
    "basic_shift": lambda: BasicBlock(16, 16, shift=True),
    "bottleneck_stride2": lambda: Bottleneck(16, 8, stride=2),
}


# -- registration and conversion --------------------------------------------------------------------

def test_registered_with_its_knobs():
    assert POLICIES.get("dstep") is DStep and DStep.trains_gates
    assert set(DStep.takes()) == {"target_flops_ratio", "block_size"}
    with pytest.raises(ValueError, match="^gate 'dstep': target_flops_ratio: must be <= 1.0, got 1.5$"):
        build_policy("dstep", target_flops_ratio=1.5, block_size=2)
    with pytest.raises(ValueError, match="does not take 'beta'"):
        build_policy("dstep", target_flops_ratio=0.5, block_size=2, beta=1.0)


def test_converts_residual_blocks_and_keeps_dense_weight_names():
    torch.manual_seed(0)
    dense = build("resnet18_tiny", task="classification", num_classes=4)
    gated = build_policy("dstep", target_flops_ratio=0.5, block_size=2).apply(copy.deepcopy(dense))
    assert len(dstep_blocks(gated)) == 4
    with pytest.raises(ValueError, match="^gate 'dstep' found no residual blocks"):
        build_policy("dstep", target_flops_ratio=0.5, block_size=2).apply(
            build("tiny", task="classification", num_classes=4)
        )
    dense_keys, gated_keys = set(dense.state_dict()), set(gated.state_dict())
    assert dense_keys <= gated_keys and all(".policy." in k for k in gated_keys - dense_keys)
    for k, v in dense.state_dict().items():
        assert torch.equal(gated.state_dict()[k], v), k


def test_block_protocol_duck_typing_and_flags():
    class Plain(nn.Module):  # torchvision-style, no flag: gated by duck typing
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.downsample = None

        def forward(self, x):
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)

    class OptOut(Plain):
        dstep_block = False

    class Broken(nn.Module):
        dstep_block = True

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3)

    assert residual_pairs(Plain()) is not None and residual_pairs(OptOut()) is None
    with pytest.raises(ValueError, match="Broken sets dstep_block"):
        residual_pairs(Broken())
    net = nn.Sequential(Plain(), OptOut())
    assert [b.dense_type for b in convert_blocks(net, tile=2)] == [Plain]
    assert isinstance(net[0], DStepBlock) and isinstance(net[1], OptOut)


# -- Eq. 1: equivalence and the merge -------------------------------------------------------------------

@pytest.mark.parametrize("tile", [1, 4])
@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_force_open_reproduces_the_dense_block(kind, tile):
    """All tiles active, all channels "compute": the streamed gated block is the dense block (eval, ≤ 1e-4)."""
    torch.manual_seed(0)
    dense = randomize_bn(BLOCKS[kind]()).eval()
    gated = DStepBlock(copy.deepcopy(dense), tile=tile).eval()
    gated.force_open = True
    clip = torch.randn(4, 2, dense.conv1.in_channels, 12, 12)  # (T, N, C, H, W)
    with torch.inference_mode():
        want = stream_block(dense, clip)
        for path in ("auto", "sparse", "dense"):
            gated.path = path
            got = stream_block(gated, clip)
            assert (got - want).abs().max() <= 1e-4, path


def test_eq1_merge_skip_reuse_compute_and_tiles():
    """h_t = S_t ⊙ [compute: relu(bn1(conv1 x_t)), reuse: h_{t-1}, skip: 0]; inactive tiles pass the identity."""
    torch.manual_seed(0)
    block = DStepBlock(randomize_bn(BasicBlock(6, 6)), tile=2).eval()
    S = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (1, 2, 2) tiles of a 4×4 map
    frames = [F.one_hot(torch.tensor([[COMPUTE] * 6]), 3).float(),  # frame 0: everything computed
              F.one_hot(torch.tensor([[SKIP, REUSE, COMPUTE, REUSE, SKIP, COMPUTE]]), 3).float()]
    x = torch.randn(2, 1, 6, 4, 4)  # (T, N, C, H, W)
    seen = []
    block.decide = lambda xs, geo: (S, frames[len(seen)])
    block.register_forward_hook(lambda m, a, out: seen.append((m.h_prev.clone(), out)))
    with torch.inference_mode():
        block.path = "dense"
        stream_block(block, x)
    full = [F.relu(block.bn1(block.conv1(x[t]))) for t in range(2)]  # (1, 6, 4, 4) each
    m = upsample_tiles(S, 2, (4, 4))  # (1, 1, 4, 4)
    h0, h1 = seen[0][0], seen[1][0]
    assert torch.allclose(h0, m * full[0])
    assert torch.equal(h1[:, [0, 4]], torch.zeros(1, 2, 4, 4))  # skipped
    assert torch.allclose(h1[:, [1, 3]], m * h0[:, [1, 3]])  # reused from t-1
    assert torch.allclose(h1[:, [2, 5]], m * full[1][:, [2, 5]])  # computed
    off = m[0, 0] == 0
    assert torch.allclose(seen[1][1][0][:, off], F.relu(x[1][0])[:, off])  # inactive tile: relu(identity)


@pytest.mark.parametrize("backbone", ["resnet18_tiny", "tsm_resnet18_tiny", "resnet50"])  # basic, shift, bottleneck
def test_inference_kernels_match_the_masked_dense_reference(backbone):
    """Gathered channels and tiles (auto / sparse) give the masked dense numbers and the same Eq. 2 counts."""
    torch.manual_seed(0)
    model = build(backbone, task="classification", num_classes=4, width=0.25)
    model = mixed_decisions(randomize_bn(build_policy("dstep", target_flops_ratio=0.5, block_size=2).apply(model)))
    model.eval()
    clip = torch.randn(2, 5, 3, 48, 48)
    outs, counts = {}, {}
    with torch.inference_mode():
        for path in ("dense", "auto", "sparse"):
            for b in dstep_blocks(model):
                b.path = path
                for conv in b.convs():
                    conv.reset_stats()
            outs[path] = model.stream(clip, reset_every=3)
            counts[path] = [conv.density for b in dstep_blocks(model) for conv in b.convs()]
    chosen = decisions(model)
    assert 0.1 < chosen["tiles"] < 0.9 and min(chosen["skip"], chosen["reuse"], chosen["compute"]) > 0.05, chosen
    for path in ("auto", "sparse"):
        assert (outs[path] - outs["dense"]).abs().max() <= 1e-4 * max(1.0, outs["dense"].abs().max().item()), path
        assert counts[path] == pytest.approx(counts["dense"], abs=1e-6), path


def test_folded_weights_follow_in_place_updates():
    """Inference folds each conv + BN (downsample included) once and refolds when any of them changes."""
    torch.manual_seed(0)
    dense = randomize_bn(BasicBlock(8, 16, stride=2)).eval()
    gated = DStepBlock(copy.deepcopy(dense), tile=2).eval()
    gated.force_open, gated.path = True, "sparse"
    clip = torch.randn(2, 1, 8, 12, 12)  # (T, N, C, H, W)
    with torch.inference_mode():
        stream_block(gated, clip)  # folds every pair
    with torch.no_grad():
        for block in (dense, gated):  # what an optimizer step or load_state_dict does: in place
            block.bn1.running_mean.add_(0.5)
            block.conv2.weight.mul_(1.5)
            block.downsample[1].weight.mul_(0.5)
    with torch.inference_mode():
        assert (stream_block(gated, clip) - stream_block(dense, clip)).abs().max() <= 1e-4


@pytest.mark.parametrize("stride,kernel,tile", [(1, 3, 1), (2, 3, 2), (1, 1, 4), (2, 3, 8)])
def test_tile_conv_computes_active_tiles_of_the_used_channels(stride, kernel, tile):
    torch.manual_seed(0)
    conv = FoldedConv(weight=torch.randn(12, 10, kernel, kernel), bias=torch.randn(12), stride=(stride, stride),
                      padding=(kernel // 2,) * 2, dilation=(1, 1))
    out_idx, in_idx = torch.tensor([0, 3, 4, 11]), torch.tensor([9, 1, 2, 5, 6])
    x = torch.randn(1, in_idx.numel(), 13, 13)
    ref = F.conv2d(x, conv.weight[out_idx][:, in_idx], conv.bias[out_idx], conv.stride, conv.padding)
    grid = (-(-ref.shape[-2] // tile), -(-ref.shape[-1] // tile))
    masks = (torch.rand(1, *grid) < 0.4, torch.zeros(1, *grid, dtype=torch.bool),
             torch.ones(1, *grid, dtype=torch.bool))
    for mask in masks:
        want = ref * upsample_tiles(mask.float(), tile, ref.shape[-2:])
        for path, crossover in (("sparse", 0.5), ("auto", 0.0), ("auto", 1.1)):
            got = tile_conv(x, conv, mask, tile=tile, out_idx=out_idx, in_idx=in_idx, crossover=crossover, path=path)
            assert torch.allclose(got, want, atol=1e-4), (path, crossover)
    nothing = tile_conv(x[:, :0], conv, mask, tile=tile, out_idx=out_idx, in_idx=in_idx[:0])
    assert torch.allclose(nothing, upsample_tiles(mask.float(), tile, ref.shape[-2:]) * conv.bias[out_idx, None, None])


def test_policy_pooling_and_spatial_conv_match_their_definitions():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 11, 9)
    sums = tile_sums(x, 4, (3, 3))
    assert torch.allclose(sums, F.avg_pool2d(x, 4, 4, ceil_mode=True, divisor_override=1), atol=1e-5)
    block = DStepBlock(BasicBlock(5, 6), tile=4)
    p = block.policy
    want = F.conv2d(sums, p.spatial_weight, p.spatial_bias * p.gain, padding=1)[:, 0]
    assert torch.allclose(p.spatial_logits(sums), want, atol=1e-5)


# -- Eq. 2: accounting ------------------------------------------------------------------------------------

def test_eq2_flops_by_hand_and_macs_protocol():
    """conv1 pays compute channels on active tiles, conv2 the non-skipped inputs on active tiles; the
    policies' cost is conv1's gate_macs; F/F_S and MacCounter agree."""
    from gatesearch.objectives import MacCounter

    torch.manual_seed(0)
    model = build("resnet18_tiny", task="classification", num_classes=4)
    build_policy("dstep", target_flops_ratio=0.5, block_size=4).apply(model)
    block = dstep_blocks(model)[0]  # layer1.0: 16 -> 16 channels at 8×8 for 32×32 frames
    geo = block.geometry((8, 8))
    assert block.conv1.in_channels == 16 and geo.grid == (2, 2)
    S = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # half the outputs
    T = F.one_hot(torch.tensor([[SKIP] * 4 + [REUSE] * 4 + [COMPUTE] * 8]), 3).float()  # 8 of 16 computed, 12 read
    counter = MacCounter(model, (3, 32, 32))
    counter.reset()
    block._account(S, T, geo, policy_macs=geo.policy_macs)
    dense = 16 * 16 * 9 * 64  # each conv: Co·Ci·k²·Ho·Wo
    assert block.conv1.dense_macs == block.conv2.dense_macs == dense
    assert block.conv1.density == pytest.approx(0.5 * 8 / 16) and block.conv2.density == pytest.approx(0.5 * 12 / 16)
    hidden = block.policy.fc1_weight.shape[0]
    policy = 16 * 64 + 16 * 9 * 4 + 16 * 4 + 2 * 16 * hidden + hidden * 3 * 16
    assert block.conv1.gate_macs == pytest.approx(policy) and block.conv2.gate_macs == 0
    spent = dense * 0.5 * 8 / 16 + dense * 0.5 * 12 / 16 + policy
    assert flops_ratio(nn.ModuleList([block])) == pytest.approx(spent / (2 * dense))
    report = counter.report()
    assert report.layers["backbone.layer1.0.conv1"].dense == dense  # fvcore agrees with the hand count
    assert report.layers["backbone.layer1.0.conv1"].effective == pytest.approx(dense * 0.25 + policy)
    assert block.conv1.decisions == pytest.approx({"tiles": 0.5, "skip": 0.25, "reuse": 0.25, "compute": 0.5})


def test_dense_twin_streams_the_original_network():
    torch.manual_seed(0)
    dense = randomize_bn(build("resnet18_tiny", task="classification", num_classes=4)).eval()
    gated = mixed_decisions(build_policy("dstep", target_flops_ratio=0.5, block_size=2).apply(copy.deepcopy(dense)))
    set_gating(gated.eval(), False)
    clip = torch.randn(1, 3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(gated.stream(clip), dense.stream(clip))
    assert flops_ratio(gated) == 1.0  # nothing gated was streamed


# -- Eq. 3: loss and schedule -------------------------------------------------------------------------------

def test_loss_schedule_and_gradients():
    torch.manual_seed(0)
    s = DStepSettings()
    model = build("resnet18_tiny", task="classification", num_classes=4)
    policy = build_policy("dstep", target_flops_ratio=0.4, block_size=2)
    policy.apply(model)
    assert policy.lam() == pytest.approx(s.lambda_alpha * math.exp(s.lambda_beta * s.warmup_epochs))  # no hook
    policy.on_epoch(model, 0, 5)
    assert policy.lam() == 0.0  # warm-up: L_task + γ·L_bound only
    low, high = policy.bounds()
    assert (low, high) == pytest.approx((0.4 * (1 - s.bound_start), 0.4 + 0.6 * s.bound_start))
    assert all(b.noise == 1.0 for b in dstep_blocks(model))
    assert policy.loss(model) is None  # nothing streamed
    policy.on_epoch(model, 4, 5)
    assert policy.lam() == pytest.approx(s.lambda_alpha * math.exp(s.lambda_beta * 4))
    assert policy.bounds() == pytest.approx((0.4 * (1 - s.bound_end), 0.4 + 0.6 * s.bound_end))
    assert all(b.noise == 0.0 for b in dstep_blocks(model))  # the last epoch trains the inference decisions

    policy.on_epoch(model, 2, 5)
    model.train()
    model.stream(torch.randn(2, 3, 3, 32, 32), reset_every=3)
    blocks = dstep_blocks(model)  # Eq. 2-3 from the per-frame records, by hand
    spent = sum(torch.stack([r.flops for r in b.records]).mean() for b in blocks)
    ratio = spent / sum(conv.dense_macs for b in blocks for conv in b.convs())
    rho = torch.stack([torch.stack([r.density for r in b.records]).mean() for b in blocks])
    low, high = policy.bounds()
    want = policy.lam() * (ratio - 0.4) ** 2 + s.gamma * (F.relu(rho - high) ** 2 + F.relu(low - rho) ** 2).mean()
    loss = policy.loss(model)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    grads = {}
    for b in dstep_blocks(model):
        for name, p in b.policy.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            grads[name] = grads.get(name, 0.0) + p.grad.abs().sum().item()  # a block with no active tile
    assert all(g > 0 for g in grads.values()), grads  # gets no channel gradient, rightly
    assert policy.loss(model) is None  # records were drained


# -- controllability (paper Table 1), fast version -------------------------------------------------------

def test_training_reaches_the_target_flops_ratio():
    """A short synthetic trial lands within ±0.05 of D on held-out clips (the full D ∈ {0.4, 0.6, 0.8}
    check is benchmarks/dstep_controllability.py)."""
    from gatesearch.data.source import load_clips
    from gatesearch.search.trial import run_trial
    from gatesearch.spaces import DataConfig, EvalConfig, TrialConfig

    data = DataConfig(train_clips=48, val_clips=24)
    cfg = TrialConfig(backbone="resnet18_tiny", gate="dstep", knobs={"target_flops_ratio": 0.4, "block_size": 2},
                      epochs=6, clip_length=4, seed=0)
    model = run_trial(cfg, data, EvalConfig(frames=4, latency_warmup=0, latency_repeats=1)).model
    val = load_clips(data, frames=16, count=24, split="val")  # per-clip FLOPs vary: measure over many clips
    reset_stats(model)
    with torch.inference_mode():
        model.stream(val["clip"], reset_every=4)
    assert abs(flops_ratio(model) - 0.4) <= 0.05, flops_ratio(model)


def test_training_after_an_inference_mode_stream():
    """The block caches its tile geometry: built under ``inference_mode`` (a quality or latency pass), it must
    still serve a training stream afterwards (autograd cannot save inference tensors)."""
    torch.manual_seed(0)
    model = build_policy("dstep", target_flops_ratio=0.6, block_size=2).apply(
        build("resnet18_tiny", task="classification", num_classes=5))
    clip = torch.randn(2, 3, 3, 32, 32)
    with torch.inference_mode():
        model.eval().stream(clip)
    model.train().stream(clip).sum().backward()
    policies = [m.policy for m in model.modules() if isinstance(m, DStepBlock)]
    assert policies and all(p.spatial_weight.grad is not None for p in policies)
