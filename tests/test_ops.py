"""Exactness of the block-sparse Skip-Conv kernels against the masked dense reference.

Every check runs on both backends: the C++ kernels (skipped only if they cannot
be built here) and the plain-PyTorch fallback. No timing asserts: speed is
measured by benchmarks/layer_bench.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from gatesearch import ops
from gatesearch.ops import _native, crossover
from gatesearch.ops.geometry import pair

TOL = 1e-4


@dataclass(frozen=True)
class Case:
    """One conv layer shape; sizes deliberately non-square and not multiples of b."""

    ci: int
    co: int
    kernel: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    hw: tuple[int, int] = (19, 23)
    n: int = 1

    @property
    def conv(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    @property
    def gate(self) -> dict:
        return dict(kernel_size=self.kernel, stride=self.stride, padding=self.padding, dilation=self.dilation)


CASES = {
    "3x3": Case(8, 12, 3, padding=1),
    "stride2": Case(8, 12, 3, stride=2, padding=1, hw=(21, 18), n=2),
    "dilation2": Case(6, 10, 3, padding=2, dilation=2, hw=(17, 20)),
    "depthwise": Case(12, 12, 3, padding=1, groups=12, hw=(18, 19), n=2),
    "depthwise_x2_stride2": Case(6, 12, 3, stride=2, padding=1, groups=6, hw=(17, 22)),
    "grouped": Case(12, 8, 3, padding=1, groups=4, hw=(15, 22)),
    "1x1": Case(16, 8, 1, hw=(13, 17), n=2),
    "k5_pad0": Case(6, 8, 5, padding=0, hw=(20, 17)),
    "k5_pad2_stride2": Case(6, 8, 5, stride=2, padding=2, hw=(19, 22), n=2),
    "one_in_channel": Case(1, 8, 3, padding=1, hw=(16, 13)),
    "asymmetric": Case(8, 8, (3, 1), stride=(2, 1), padding=(1, 0), hw=(18, 11)),
    # a ResNet stem: RGB halos of 13 x 13 positions, the gate's 16-position channel sums (gate.cpp)
    "rgb_stem": Case(3, 8, 7, stride=2, padding=3, hw=(30, 37)),
}
BLOCKS = [1, 2, 4, 8]
DENSITIES = [0.0, 0.1, 0.5, 1.0]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


pytestmark = pytest.mark.usefixtures("quick_crossover")


@pytest.fixture(params=["native", "torch"])
def backend(request):
    """Run the test on the C++ kernels, then on the PyTorch fallback."""
    if request.param == "native":
        if not _native.available():
            pytest.skip("C++ kernels unavailable on this machine")
        yield "native"
    else:
        with _native.disabled():
            yield "torch"


def make_layer(case: Case, block: int, *, seed: int = 0, fmt=torch.contiguous_format):
    """Random residual, kaiming-scaled weight, previous output z and the layer geometry."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = pair(case.kernel, "kernel")
    r = torch.randn(case.n, case.ci, *case.hw, generator=gen).contiguous(memory_format=fmt)
    fan_in = case.ci // case.groups * kh * kw
    weight = torch.randn(case.co, case.ci // case.groups, kh, kw, generator=gen) / math.sqrt(fan_in)
    geom = ops.resolve_geometry(r.shape, weight.shape, block_size=block, **case.conv)
    z = torch.randn(case.n, case.co, *geom.out_hw, generator=gen).contiguous(memory_format=fmt)
    return r, weight, z, geom


def random_mask(n: int, grid: tuple[int, int], density: float, *, seed: int = 0) -> torch.Tensor:
    """Bool (N, Hb, Wb) with round(density * blocks) active blocks per stream (at least one if density > 0)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = grid[0] * grid[1]
    count = 0 if density == 0 else max(1, round(density * blocks))
    mask = torch.zeros(n, blocks, dtype=torch.bool)
    for s in range(n):
        mask[s, torch.randperm(blocks, generator=gen)[:count]] = True
    return mask.view(n, *grid)


# ---------------------------------------------------------------------------
# accumulate_block_sparse_ == accumulate_masked_dense_
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", CASES)
def test_block_sparse_matches_masked_dense(backend, name, block, density, layout):
    case = CASES[name]
    r, weight, z, geom = make_layer(case, block, fmt=LAYOUTS[layout])
    mask = random_mask(case.n, geom.grid, density)
    expected = ops.accumulate_masked_dense_(z.clone(), r, weight, mask, block_size=block, **case.conv)
    for path in ops.PATHS:
        out = z.clone()
        got = ops.accumulate_block_sparse_(out, r, weight, mask, block_size=block, path=path, **case.conv)
        assert got is out, "must accumulate in place and return z"
        err = (got - expected).abs().max().item()
        assert err <= TOL, f"path={path}: max abs diff {err:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 4, 32])
def test_large_layer_on_two_threads(backend, groups, layout):
    """Big enough that the gate, gather, scatter and depthwise loops split across threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = Case(32, 32, 3, padding=1, groups=groups, hw=(45, 50), n=2)
        r, weight, z, geom = make_layer(case, 8, fmt=LAYOUTS[layout])
        mask = random_mask(case.n, geom.grid, 0.6)
        expected = ops.accumulate_masked_dense_(z.clone(), r, weight, mask, block_size=8, **case.conv)
        got = ops.accumulate_block_sparse_(z.clone(), r, weight, mask, block_size=8, path="sparse", **case.conv)
        assert (got - expected).abs().max().item() <= TOL
        gate = ops.norm_gate_block_mask(r, block_size=8, threshold=0.0, **case.gate)
        assert torch.equal(gate, reference_gate(r, case, 8, 0.0, 1.0))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["3x3", "stride2", "depthwise", "grouped", "1x1", "k5_pad2_stride2"])
def test_residual_pair_equals_its_difference(backend, name, layout):
    """(x, x_prev) in place of r = x - x_prev: the gate and every path subtract on the fly, same result."""
    case = CASES[name]
    x, weight, z, geom = make_layer(case, 4, fmt=LAYOUTS[layout])
    x_prev = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
              * (torch.rand(x.shape[0], 1, *x.shape[2:], generator=torch.Generator().manual_seed(6)) > 0.6))
    x_prev = x_prev.contiguous(memory_format=LAYOUTS[layout])
    r = x - x_prev
    threshold = _threshold_in_a_gap(F.conv2d(r.abs(), torch.ones(1, case.ci, *pair(case.kernel, "k")), None,
                                             case.stride, case.padding, case.dilation))
    mask = ops.norm_gate_block_mask(r, block_size=4, threshold=threshold, **case.gate)
    assert torch.equal(ops.norm_gate_block_mask(x, block_size=4, threshold=threshold, r_prev=x_prev, **case.gate), mask)
    assert 0 < ops.block_density(mask, geom.out_hw, 4).mean() < 1
    for path in ops.PATHS:
        expected = ops.accumulate_block_sparse_(z.clone(), r, weight, mask, block_size=4, path=path, **case.conv)
        got = ops.accumulate_block_sparse_(z.clone(), x, weight, mask, block_size=4, path=path, r_prev=x_prev,
                                           **case.conv)
        assert (got - expected).abs().max().item() <= TOL, path
    # a pair in two different layouts still works (the residual is formed first)
    other = x_prev.contiguous(
        memory_format=torch.contiguous_format if layout == "channels_last" else torch.channels_last
    )
    got = ops.accumulate_block_sparse_(z.clone(), x, weight, mask, block_size=4, path="sparse", r_prev=other,
                                       **case.conv)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("path", ops.PATHS)
@pytest.mark.parametrize("name", ["3x3", "stride2", "depthwise", "1x1"])
def test_resolved_step_and_gate_match_the_one_shot_calls(backend, name, path):
    """``sparse_step`` / ``norm_gate`` (resolved once per clip) == the one-shot functions, frame after frame,
    and operands in another layout than the resolved one still come out right."""
    case = CASES[name]
    x, weight, z, geom = make_layer(case, 2, fmt=torch.channels_last)
    step = ops.sparse_step(z, x, weight, block_size=2, path=path, **case.conv)
    gate = ops.norm_gate(x, block_size=2, threshold=0.5, out_hw=geom.out_hw, **case.gate)
    z_ref = z.clone()
    for seed, fmt in [(1, torch.channels_last), (2, torch.channels_last), (3, torch.contiguous_format)]:
        x_next = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) > 0.8)).contiguous(
            memory_format=fmt
        )
        r = x_next - x
        mask = ops.norm_gate_block_mask(r, block_size=2, threshold=0.5, **case.gate)
        assert torch.equal(gate(x_next, x.contiguous(memory_format=fmt)), mask)
        ops.accumulate_masked_dense_(z_ref, r, weight, mask, block_size=2, **case.conv)
        rows = step(z, x_next, mask, x.contiguous(memory_format=fmt))
        assert rows in (-1, ops.active_positions(mask, geom.out_hw, 2))
        assert (z - z_ref).abs().max().item() <= TOL
        x = x_next


@pytest.mark.parametrize("path", ["sparse", "auto"])
def test_untouched_blocks_keep_previous_output(backend, path):
    case = CASES["stride2"]
    r, weight, z, geom = make_layer(case, 4)
    mask = random_mask(case.n, geom.grid, 0.3)
    got = ops.accumulate_block_sparse_(z.clone(), r, weight, mask, block_size=4, path=path, **case.conv)
    keep = ~ops.upsample_block_mask(mask, 4, geom.out_hw).expand_as(z)
    assert torch.equal(got[keep], z[keep])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_and_strided_z_layouts(backend, layout):
    case = CASES["3x3"]
    r, weight, _, geom = make_layer(case, 4, fmt=LAYOUTS[layout])
    mask = random_mask(case.n, geom.grid, 0.5)
    ho, wo = geom.out_hw
    expected = ops.accumulate_masked_dense_(torch.zeros(1, case.co, ho, wo), r, weight, mask, block_size=4, **case.conv)
    for z in (
        torch.zeros(1, case.co, ho, wo),  # NCHW
        torch.zeros(1, case.co, ho, wo).contiguous(memory_format=torch.channels_last),
        torch.zeros(1, case.co, wo, ho).transpose(2, 3),  # neither layout: worked on a copy, written back
    ):
        got = ops.accumulate_block_sparse_(z, r, weight, mask, block_size=4, path="sparse", **case.conv)
        assert got is z
        assert (z - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ops.PATHS)
def test_sixteen_frame_stream_stays_exact(backend, path, layout):
    """z keeps accumulating over a clip (Skip-Convolutions, Eq. 3 applied 15 times)."""
    case = Case(8, 12, 3, padding=1, hw=(21, 26), n=2)
    block, fmt = 4, LAYOUTS[layout]
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(case.co, case.ci, 3, 3, generator=gen) / math.sqrt(case.ci * 9)
    bias = torch.randn(case.co, generator=gen)
    x = torch.randn(case.n, case.ci, *case.hw, generator=gen).contiguous(memory_format=fmt)
    z_fast = F.conv2d(x, weight, bias, padding=1)  # reference frame: dense, bias included
    z_ref = z_fast.clone()
    for _ in range(15):
        # a moving object: the residual is non-zero in a small window only
        step = torch.zeros_like(x)
        y0, x0 = torch.randint(0, 15, (2,), generator=gen).tolist()
        step[:, :, y0 : y0 + 6, x0 : x0 + 6] = torch.randn(case.n, case.ci, 6, 6, generator=gen)
        x_next = (x + step).contiguous(memory_format=fmt)
        r = x_next - x
        mask = ops.norm_gate_block_mask(r, kernel_size=3, padding=1, block_size=block, threshold=0.0)
        assert 0 < ops.block_density(mask, z_fast.shape[-2:], block).max() < 1
        ops.accumulate_block_sparse_(z_fast, r, weight, mask, block_size=block, padding=1, path=path)
        ops.accumulate_masked_dense_(z_ref, r, weight, mask, block_size=block, padding=1)
        x = x_next
    assert (z_fast - z_ref).abs().max().item() <= TOL
    # threshold 0 skips only zero residuals, so the stream equals the dense conv of the last frame
    assert (z_fast - F.conv2d(x, weight, bias, padding=1)).abs().max().item() <= TOL


def test_auto_follows_the_crossover(backend, monkeypatch):
    case = CASES["3x3"]
    r, weight, z, geom = make_layer(case, 2)
    mask = random_mask(1, geom.grid, 0.5)
    expected = ops.accumulate_masked_dense_(z.clone(), r, weight, mask, block_size=2, **case.conv)
    calls = []

    def fake_dense(z_, r_, w_, m_, g_):
        calls.append("dense")
        return ops.accumulate_masked_dense_(z_, r_, w_, m_, block_size=g_.block, **case.conv)

    monkeypatch.setattr("gatesearch.ops.block_sparse.accumulate_dense_", fake_dense)
    for rho, path in [(0.0, "dense"), (1.0, "sparse"), (0.9, "sparse"), (0.1, "dense")]:
        calls.clear()
        monkeypatch.setattr(crossover, "crossover_density", lambda *a, rho=rho, **k: rho)
        got = ops.accumulate_block_sparse_(z.clone(), r, weight, mask, block_size=2, path="auto", **case.conv)
        assert calls == ([path] if path == "dense" else []), f"crossover {rho} should take {path}"
        assert (got - expected).abs().max().item() <= TOL


def test_bad_arguments_fail_with_one_line():
    case = CASES["3x3"]
    r, weight, z, geom = make_layer(case, 4)
    mask = random_mask(1, geom.grid, 0.5)
    with pytest.raises(ValueError, match="path"):
        ops.accumulate_block_sparse_(z, r, weight, mask, block_size=4, path="fast", **case.conv)
    with pytest.raises(ValueError, match="block_mask"):
        ops.accumulate_block_sparse_(z, r, weight, mask[:, :-1], block_size=4, **case.conv)
    with pytest.raises(ValueError, match="z has shape"):
        ops.accumulate_block_sparse_(z[:, :-1], r, weight, mask, block_size=4, **case.conv)
    with pytest.raises(ValueError, match="groups"):
        ops.accumulate_block_sparse_(z, r, weight, mask, block_size=4, padding=1, groups=3)


# ---------------------------------------------------------------------------
# norm_gate_block_mask (Skip-Convolutions, Eq. 5 / Eq. 7, structured)
# ---------------------------------------------------------------------------


def reference_gate(r, case: Case, block: int, threshold: float, scale: float) -> torch.Tensor:
    """Straightforward gate: conv of |r| with an all-ones kernel, threshold, max-pool b."""
    kh, kw = pair(case.kernel, "kernel")
    ones = torch.ones(1, r.shape[1], kh, kw)
    score = F.conv2d(r.abs(), ones, None, case.stride, case.padding, case.dilation)  # (N, 1, Ho, Wo)
    active = ((score * scale) > threshold).float()
    return F.max_pool2d(active, block, block, ceil_mode=True).squeeze(1) > 0


@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", ["3x3", "stride2", "dilation2", "k5_pad2_stride2", "1x1", "asymmetric"])
def test_gate_matches_reference(backend, name, block, scale):
    case = CASES[name]
    r, _, _, geom = make_layer(case, block, fmt=torch.channels_last if block % 2 else torch.contiguous_format)
    r = r * (torch.rand(r.shape[0], 1, *r.shape[2:], generator=torch.Generator().manual_seed(1)) > 0.7)  # sparse
    kh, kw = pair(case.kernel, "kernel")
    scores = F.conv2d(r.abs(), torch.ones(1, case.ci, kh, kw), None, case.stride, case.padding, case.dilation) * scale
    for threshold in (0.0, _threshold_in_a_gap(scores), float(scores.max()) + 1):
        got = ops.norm_gate_block_mask(r, block_size=block, threshold=threshold, scale=scale, **case.gate)
        assert got.dtype == torch.bool and got.shape == (case.n, *geom.grid)
        assert torch.equal(got, reference_gate(r, case, block, threshold, scale))


def _threshold_in_a_gap(scores: torch.Tensor) -> float:
    """A threshold far from every score (between the 40th and 80th percentile), so summation order cannot flip it."""
    values = scores.flatten().unique()  # sorted
    lo, hi = int(0.4 * len(values)), int(0.8 * len(values))
    gaps = values[lo + 1 : hi + 1] - values[lo:hi]
    i = lo + int(gaps.argmax())
    return float(values[i] + values[i + 1]) / 2


@pytest.mark.parametrize("block", [2, 4, 8])
def test_gate_is_max_pool_of_position_gate(backend, block):
    """"Structured Sparsity": block mask = max-pool_b of the unstructured mask; constant on each block."""
    case = CASES["stride2"]
    r, _, _, geom = make_layer(case, block)
    threshold = float(F.conv2d(r.abs(), torch.ones(1, case.ci, 3, 3), None, 2, 1).median())
    positions = ops.norm_gate_block_mask(r, block_size=1, threshold=threshold, **case.gate)
    blocks = ops.norm_gate_block_mask(r, block_size=block, threshold=threshold, **case.gate)
    assert 0 < positions.float().mean() < 1
    pooled = F.max_pool2d(positions[:, None].float(), block, block, ceil_mode=True).squeeze(1) > 0
    assert torch.equal(blocks, pooled)
    up = ops.upsample_block_mask(blocks, block, geom.out_hw)[:, 0]  # (N, Ho, Wo)
    assert torch.equal(up | positions, up), "every active position lies in an active block"
    ho, wo = geom.out_hw
    for by in range(geom.grid[0]):
        for bx in range(geom.grid[1]):
            cell = up[:, by * block : min(ho, (by + 1) * block), bx * block : min(wo, (bx + 1) * block)]
            assert torch.equal(cell, blocks[:, by, bx, None, None].expand_as(cell))


@pytest.mark.parametrize("block", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["3x3", "stride2", "dilation2", "k5_pad2_stride2", "asymmetric"])
def test_zero_threshold_wakes_exactly_the_blocks_that_see_a_pixel(backend, name, block):
    case = CASES[name]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        pair(case.kernel, "k"), pair(case.stride, "s"), pair(case.padding, "p"), pair(case.dilation, "d")
    )
    h, w = case.hw
    _, _, _, geom = make_layer(case, block)
    ho, wo = geom.out_hw
    for py, px in [(0, 0), (h - 1, w - 1), (h // 2, w // 3), (1, w - 2)]:
        r = torch.zeros(1, case.ci, h, w)
        r[0, case.ci - 1, py, px] = 1e-30  # tiny but non-zero
        got = ops.norm_gate_block_mask(r, block_size=block, threshold=0.0, **case.gate)
        expected = torch.zeros(1, *geom.grid, dtype=torch.bool)
        for oy in range(ho):
            for ox in range(wo):
                sees_y = any(oy * sh - ph + i * dh == py for i in range(kh))
                sees_x = any(ox * sw - pw + j * dw == px for j in range(kw))
                if sees_y and sees_x:
                    expected[0, oy // block, ox // block] = True
        assert torch.equal(got, expected), f"pixel ({py}, {px})"


def test_gate_on_zero_residual_is_empty(backend):
    r = torch.zeros(2, 5, 12, 9)
    mask = ops.norm_gate_block_mask(r, kernel_size=3, padding=1, block_size=4, threshold=0.0)
    assert mask.shape == (2, 3, 3) and not mask.any()


def test_gate_out_hw_override(backend):
    r = torch.randn(1, 4, 10, 10)
    mask = ops.norm_gate_block_mask(r, kernel_size=3, padding=1, block_size=4, threshold=0.0, out_hw=(12, 9))
    assert mask.shape == (1, 3, 3)


# ---------------------------------------------------------------------------
# block_density
# ---------------------------------------------------------------------------


def test_block_density_weights_partial_edge_blocks():
    # Ho=10, Wo=7, b=4: block rows have 4, 4, 2 positions, block cols 4, 3
    mask = torch.zeros(3, 3, 2, dtype=torch.bool)
    mask[0, 0, 0] = True  # 16 positions
    mask[0, 2, 1] = True  # 2 * 3 = 6 positions
    mask[1] = True
    got = ops.block_density(mask, (10, 7), 4)
    assert torch.allclose(got, torch.tensor([22 / 70, 1.0, 0.0]))
    assert got.dtype == torch.float32


@pytest.mark.parametrize("block, out_hw", [(1, (5, 6)), (3, (11, 13)), (4, (10, 7))])
def test_active_positions_counts_what_block_density_weighs(backend, block, out_hw):
    grid = (-(-out_hw[0] // block), -(-out_hw[1] // block))
    mask = random_mask(3, grid, 0.4, seed=2)
    expected = float(ops.block_density(mask, out_hw, block).sum()) * out_hw[0] * out_hw[1]
    assert ops.active_positions(mask, out_hw, block) == round(expected)


def test_block_density_matches_upsampled_mask():
    mask = random_mask(2, (4, 5), 0.4, seed=7)
    positions = ops.upsample_block_mask(mask, 3, (11, 13)).float().mean(dim=(1, 2, 3))
    assert torch.allclose(ops.block_density(mask, (11, 13), 3), positions)


# ---------------------------------------------------------------------------
# crossover calibration
# ---------------------------------------------------------------------------


def test_calibration_returns_a_density_and_is_cached(backend, monkeypatch, tmp_path):
    geom = ops.resolve_geometry((1, 16, 24, 24), (16, 16, 3, 3), stride=1, padding=1, dilation=1, groups=1,
                                block_size=4)
    result = ops.calibrate_crossover(geom, budget_s=0.05)
    assert 0.0 <= result["crossover"] <= 1.0
    assert result["dense_ms"] > 0 and len(result["sparse_ms"]) == 2

    crossover.clear_cache()
    monkeypatch.delenv("GATESEARCH_NO_DISK_CACHE")
    monkeypatch.setattr(crossover, "_cache_file", lambda: tmp_path / "crossover.json")
    runs = []
    monkeypatch.setattr(crossover, "calibrate", lambda *a, **k: runs.append(1) or {"crossover": 0.42})
    assert ops.crossover_density(geom, batch=1, channels_last=True) == 0.42
    assert ops.crossover_density(geom, batch=1, channels_last=True) == 0.42
    assert runs == [1], "calibrated once per signature"
    crossover.clear_cache()  # a new process finds it on disk
    assert ops.crossover_density(geom, batch=1, channels_last=True) == 0.42
    assert runs == [1]

    crossover.clear_cache()  # a calibration on a busy machine is used but not kept
    monkeypatch.setattr(crossover, "calibrate", lambda *a, **k: runs.append(2) or {"crossover": 0.3, "stable": False})
    assert ops.crossover_density(geom, batch=1, channels_last=False) == 0.3
    crossover.clear_cache()
    assert ops.crossover_density(geom, batch=1, channels_last=False) == 0.3
    assert runs == [1, 2, 2]


# ---------------------------------------------------------------------------
# C++ build failure falls back to PyTorch on its own
# ---------------------------------------------------------------------------


def test_unbuildable_extension_falls_back_to_pytorch(tmp_path):
    """A machine without a working compiler still gets exact results, with one warning."""
    script = (
        "import torch, torch.nn.functional as F\n"
        "from gatesearch import ops\n"
        "r = torch.randn(1, 4, 9, 10); w = torch.randn(4, 4, 3, 3) / 6; z = torch.zeros(1, 4, 9, 10)\n"
        "m = ops.norm_gate_block_mask(r, kernel_size=3, padding=1, block_size=4, threshold=0.0)\n"
        "ops.accumulate_block_sparse_(z, r, w, m, block_size=4, padding=1, path='sparse')\n"
        "print(ops.native_available(), (z - F.conv2d(r, w, None, 1, 1)).abs().max().item())\n"
    )
    env = {**os.environ, "GATESEARCH_CACHE_DIR": str(tmp_path), "CXX": "/bin/false", "GATESEARCH_NO_DISK_CACHE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    native, err = done.stdout.split()
    assert native == "False" and float(err) <= TOL
    assert "PyTorch fallback" in done.stderr


def test_a_stale_build_lock_does_not_hang_the_next_process(tmp_path):
    """A process killed mid-build leaves torch's ``lock`` file behind; the next one removes it and loads."""
    if not _native.available():
        pytest.skip("C++ kernels unavailable")
    import shutil

    _, built = _native._build_dir()
    copy = tmp_path / "ext" / built.name
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "build.flock"))
    (copy / "lock").touch()  # as a killed builder leaves it
    script = "from gatesearch import ops; print(ops.native_available())"
    env = {**os.environ, "GATESEARCH_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
    assert not (copy / "lock").exists()


def test_the_build_lock_is_held_by_one_process_at_a_time(tmp_path):
    import fcntl

    with _native._build_lock(tmp_path), open(tmp_path / "build.flock") as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "build.flock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit


def test_native_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setenv("GATESEARCH_NATIVE", "0")
    assert not _native.available()
    assert not ops.native_available()


# ---------------------------------------------------------------------------
# BlockReference (reference mode "block")
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["3x3", "stride2", "dilation2", "depthwise", "grouped", "1x1", "k5_pad2_stride2",
                                  "one_in_channel", "asymmetric", "rgb_stem"])
def test_block_reference_matches_the_fallback_and_the_dense_conv(name, layout):
    """C++ and PyTorch block references give the same masks and outputs frame after frame; the sparse step equals
    z[active] = conv(x)[active]; at threshold 0 the stream stays the dense conv of the current frame."""
    if not _native.available():
        pytest.skip("C++ kernels unavailable")
    case = CASES[name]
    x, weight, _, geom = make_layer(case, 4, fmt=LAYOUTS[layout])
    gen = torch.Generator().manual_seed(9)
    frames = [x]
    for _ in range(4):
        bump = torch.randn(x.shape, generator=gen) * (torch.rand(x.shape[0], 1, *x.shape[2:], generator=gen) > 0.85)
        frames.append((frames[-1] + bump).contiguous(memory_format=LAYOUTS[layout]))
    for threshold in (0.0, 12.0):
        z, skipped = {}, False
        refs = {}
        for backend in ("native", "torch"):
            with (_native.disabled() if backend == "torch" else torch.no_grad()):
                refs[backend] = ops.BlockReference(x, geom)
            z[backend] = F.conv2d(x, weight, None, **case.conv).contiguous(memory_format=LAYOUTS[layout])
        z_masked = z["native"].clone()
        masked_ref = ops.BlockReference(x, geom)
        for frame in frames[1:]:
            masks = {}
            for backend in ("native", "torch"):
                with (_native.disabled() if backend == "torch" else torch.no_grad()):
                    masks[backend] = refs[backend].gate(frame, threshold=threshold)
                    refs[backend].step(z[backend], frame, weight, None, masks[backend], max_rows=10**9)
            assert torch.equal(masks["native"], masks["torch"])
            skipped |= not bool(masks["native"].all())
            masked_ref.recompute(z_masked, frame, weight, None, masked_ref.gate(frame, threshold=threshold))
            assert (z["native"] - z["torch"]).abs().max().item() <= TOL
            assert (z["native"] - z_masked).abs().max().item() <= TOL
        if threshold == 0.0:
            dense = F.conv2d(frames[-1], weight, None, **case.conv)
            assert (z["native"] - dense).abs().max().item() <= TOL
        else:
            assert skipped, "threshold 12 must skip some block"


def test_onednn_gemm_equals_the_mkl_one(monkeypatch):
    """Where oneDNN is there, GEMM kernels multiply with its reordered weight (rows padded to a few sizes per
    octave); the result is the at::mm one, at row counts across the padding steps."""
    from gatesearch.ops import block_sparse, packing

    if not _native.available() or packing.onednn_weight(torch.ones(2, 2, 1, 1), packing.Kind.GEMM, 1) is None:
        pytest.skip("C++ kernels or oneDNN unavailable")
    assert packing.onednn_weight(torch.ones(4, 2, 3, 3), packing.Kind.GEMM, 2) is None  # grouped: at::mm / bmm
    case = Case(40, 24, 3, padding=1, hw=(30, 31))
    r, weight, z, geom = make_layer(case, 2, fmt=torch.channels_last)
    for density in (0.02, 0.1, 0.3, 0.7):
        mask = random_mask(case.n, geom.grid, density)
        fast = ops.accumulate_block_sparse_(z.clone(), r, weight, mask, block_size=2, path="sparse", **case.conv)
        with monkeypatch.context() as m:
            m.setattr(block_sparse, "onednn_weight", lambda *args: None)
            mkl = ops.accumulate_block_sparse_(z.clone(), r, weight, mask, block_size=2, path="sparse", **case.conv)
        assert (fast - mkl).abs().max().item() <= TOL


def test_rgb_stem_gate_fires_at_each_blocks_largest_window():
    """The gate of a 7x7 stride-2 RGB stem (13 x 13 halos, whose per-position channel sums gate.cpp forms 16
    positions per vector) fires a block exactly when the threshold lies below its largest window sum of |x - ref|,
    summed here in float64 by a plain conv."""
    if not _native.available():
        pytest.skip("C++ kernels unavailable")
    case = CASES["rgb_stem"]
    gen = torch.Generator().manual_seed(3)
    x0 = torch.zeros(1, 3, *case.hw).contiguous(memory_format=torch.channels_last)
    geom = ops.resolve_geometry(x0.shape, (8, 3, 7, 7), block_size=4, **case.conv)
    for _ in range(3):
        x = torch.rand(1, 3, *case.hw, generator=gen).contiguous(memory_format=torch.channels_last)
        windows = F.conv2d(x.double().abs().sum(1, keepdim=True), torch.ones(1, 1, 7, 7, dtype=torch.float64),
                           stride=2, padding=3)
        peaks = F.max_pool2d(windows, 4, ceil_mode=True).flatten().tolist()  # per block, row-major
        assert len(peaks) == geom.grid[0] * geom.grid[1]
        for i, peak in enumerate(peaks):
            for factor, fires in ((1 - 1e-4, True), (1 + 1e-4, False)):
                mask = ops.BlockReference(x0, geom).gate(x, threshold=peak * factor)
                assert bool(mask.flatten()[i]) == fires, (i, factor)
