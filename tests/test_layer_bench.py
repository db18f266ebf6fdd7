"""The single-layer bench (ops/bench.py): its native frame-step row runs the plan, on frames that alternate."""

import pytest

from gatesearch.ops import _native
from gatesearch.ops.bench import FrameStepLayer, _layer, bench_layer, layer_rows
from gatesearch.policies.skipconv import SkipConv2d

pytestmark = pytest.mark.skipif(not _native.available(), reason="C++ kernels unavailable")


def test_the_frame_step_row_is_exact_and_fires_the_requested_blocks_every_frame(monkeypatch):
    """Every timed frame recomputes the same 4 of 16 blocks (a frame equal to its predecessor would fire none and
    pull the mean down), natively (the layer's Python forward would fail the run), and equals the masked dense
    formulation and the dense conv."""

    def python_path(self, x):
        raise AssertionError("the layer ran in Python: the frame plan was bypassed")

    monkeypatch.setattr(SkipConv2d, "forward", python_path)
    r = bench_layer(channels=32, size=32, kernel=3, block=8, density=0.25, threads=2, repeats=5)
    fs = r["frame_step"]
    assert fs["planned"] and fs["frames"] == 3 + 5  # warm-up and timed residual frames
    assert fs["density"] == 0.25 and fs["check_densities"] == [0.25, 0.25]
    assert fs["max_abs_diff_masked"] <= 1e-4 and fs["max_abs_diff_dense"] <= 1e-4
    assert r["density"] == 0.25 and r["speedup"] == fs["speedup"] > 0
    rows = layer_rows(r)
    assert [row["path"] for row in rows] == ["frame step", "per-layer"]
    assert all(row["bar"] is None and row["met"] is None for row in rows)  # issue 4's bars: its 64ch 56² layer
    assert r["per_layer"]["density"] == 0.25 and r["per_layer"]["max_abs_diff"] <= 1e-4


def test_a_frame_equal_to_its_predecessor_fires_no_block():
    """What the density check above catches: frames that stop alternating recompute nothing."""
    fs = FrameStepLayer(_layer(8, 16, 3, 4, 0.25), 4)
    fs.start()
    try:
        fs.step()  # B after the reference A: the chosen blocks fire
        assert float(fs.last_mask().float().mean()) == 0.25
        fs.index -= 1  # B again
        fs.step()
        assert not bool(fs.last_mask().any())
    finally:
        fs.stop()


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "block", "own_pixels"), [
    (3, 1, 1, 1, 8, True), (3, 2, 1, 1, 4, True), (1, 2, 0, 1, 2, True), (3, 1, 2, 2, 8, True),
    (3, 1, 2, 2, 4, False), (5, 1, 2, 1, 2, False)])
def test_the_firing_residual_fires_the_chosen_blocks(kernel, stride, padding, dilation, block, own_pixels):
    """What the bench and the plan's crossover calibration feed a layer: every chosen block fires at ε = 0, and
    only those where blocks have input pixels of their own (a 3×3 conv dilated 2 spans 5 pixels: in 4×4 blocks
    none is a block's own, so the pixel under the centre wakes neighbours too)."""
    import torch

    from gatesearch.ops.firing import chosen_blocks, firing_residual
    from gatesearch.ops.gate import norm_gate_block_mask
    from gatesearch.ops.geometry import resolve_geometry

    geom = resolve_geometry((1, 4, 29, 31), (4, 4, kernel, kernel), stride=stride, padding=padding,
                            dilation=dilation, groups=1, block_size=block)
    gen = torch.Generator().manual_seed(0)
    hb, wb = geom.grid
    cells = chosen_blocks(geom, max(1, hb * wb // 4), gen)
    mask = norm_gate_block_mask(firing_residual(geom, cells, gen), kernel_size=kernel, stride=stride,
                                padding=padding, dilation=dilation, block_size=block, threshold=0.0)
    fired = set(torch.nonzero(mask[0].flatten()).flatten().tolist())
    assert set(cells) <= fired
    assert (fired == set(cells)) == own_pixels
