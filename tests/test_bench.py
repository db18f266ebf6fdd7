"""``gatesearch bench`` and ``run --compare-dense``: fidelity against the dense twin, sweeps, the twin itself."""

import copy
import json

import pytest
import torch
from test_cli import one_line_error

from gatesearch.bench import BenchConfig, BenchError, lines, parse_knobs, parse_values, run_bench
from gatesearch.models import build_model
from gatesearch.objectives.bench import bench_model
from gatesearch.objectives.fidelity import fidelity, stream_outputs
from gatesearch.policies import build_policy
from gatesearch.spaces import TrialConfig


def gated_tiny(threshold, task="classification", **knobs):
    dense = build_model(TrialConfig(backbone="tiny", task=task), 12).eval()
    knobs = {"block_size": 2, **knobs, "threshold": threshold}
    return dense, build_policy("input_norm", **knobs).apply(copy.deepcopy(dense)).eval()


# -- fidelity --------------------------------------------------------------------------------------


def test_fidelity_numbers_on_a_constructed_case():
    dense = torch.tensor([[[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]]])  # (B=1, T=2, K=3)
    gated = torch.tensor([[[3.0, 4.0, 0.5], [0.0, 2.0, 0.0]]])  # frame 0: error 0.5/5, frame 1: sqrt(5), top-1 flips
    f = fidelity(dense, gated, task="classification", frame_hw=(32, 32))
    assert f.rel_error_max == pytest.approx(5 ** 0.5)
    assert f.rel_error_median == pytest.approx((0.1 + 5 ** 0.5) / 2)
    assert f.agreement == 0.5 and f.agreement_kind == "top1"


def test_pck_agreement_is_within_the_radius_of_the_dense_peak():
    dense = torch.zeros(1, 2, 1, 8, 8)
    dense[0, :, 0, 2, 2] = 1.0  # peak at cell (2, 2) on both frames
    gated = torch.zeros(1, 2, 1, 8, 8)
    gated[0, 0, 0, 2, 3] = 1.0  # one cell (4 px) away: beyond the PCK radius, 0.2 * 0.25 * 32 = 1.6 px
    gated[0, 1, 0, 2, 2] = 1.0
    f = fidelity(dense, gated, task="heatmap", frame_hw=(32, 32))
    assert f.agreement == 0.5 and f.agreement_kind == "pck"


def test_keep_all_gate_is_the_dense_output(static_clip):
    dense, gated = gated_tiny(0.0)
    with torch.inference_mode():
        f = fidelity(stream_outputs(dense, static_clip, reset_every=None),
                     stream_outputs(gated, static_clip, reset_every=None), task="classification", frame_hw=(32, 32))
    assert f.rel_error_max <= 1e-5 and f.agreement == 1.0


@pytest.mark.parametrize("task", ["classification", "heatmap"])
def test_a_gate_that_skips_everything_is_not_the_dense_output(static_clip, task):
    dense, gated = gated_tiny(1e9, task=task)
    result = bench_model(dense, gated, static_clip, reset_every=None, repeats=1, warmup=0)
    assert result["mean_density"] < 0.1  # only the reference frame was computed
    assert result["rel_error_median"] > 1e-3 and result["rel_error_max"] >= result["rel_error_median"]
    assert result["max_abs_diff"] <= 1e-4  # still exact against the masked formulation of the same gate


def test_classification_outputs_are_the_running_clip_prediction(static_clip):
    dense, _ = gated_tiny(0.0)
    with torch.inference_mode():
        out = stream_outputs(dense, static_clip, reset_every=None)  # (1, T, K)
        assert out.shape[:2] == static_clip.shape[:2]
        assert torch.allclose(out[:, -1], dense.stream(static_clip), atol=1e-6)  # after the last frame: the clip's


# -- the dense twin of an artifact ----------------------------------------------------------------


@pytest.mark.parametrize("trial", [
    TrialConfig(gate="input_norm", knobs={"threshold": 0.0, "block_size": 2}),
    TrialConfig(backbone="resnet18_tiny", gate="dstep", knobs={"target_flops_ratio": 0.5, "block_size": 2}),
    TrialConfig(backbone="r2plus1d_tiny", gate="vared2", knobs={"search_space_size": 2, "lambda_e": 1.0}),
], ids=lambda t: t.gate)
def test_dense_twin_carries_every_dense_weight(tmp_path, trial):
    from gatesearch.export import dense_twin, load_artifact, save_artifact, trial_meta
    from gatesearch.spaces import DataConfig

    gated = build_model(trial, 12)
    meta = trial_meta(trial, metrics={}, data=DataConfig(), num_classes=12, frame_shape=(3, 32, 32))
    art = load_artifact(save_artifact(tmp_path / "art", gated, meta))
    twin = dense_twin(art)
    gated_state = art.model.state_dict()
    for name, value in twin.state_dict().items():  # each dense weight is a gated weight, by value
        assert any(v.shape == value.shape and torch.equal(v, value) for v in gated_state.values()), name
    fresh = build_model(TrialConfig(backbone=trial.backbone, task=trial.task, seed=1), 12)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), twin.state_dict().values()))


def test_dense_twin_refuses_weights_it_cannot_fill():
    from gatesearch.policies.dense_twin import load_dense_twin

    dense = build_model(TrialConfig(), 12)
    state = {k: v for k, v in build_model(TrialConfig(gate="input_norm", knobs={"threshold": 1.0, "block_size": 2}), 12)
             .state_dict().items() if "stem" not in k}
    with pytest.raises(ValueError, match="no value for"):
        load_dense_twin(dense, state, build_policy("input_norm", threshold=1.0, block_size=2))


# -- the bench: library and CLI --------------------------------------------------------------------


def test_sweep_gives_one_row_per_threshold():
    cfg = BenchConfig(size=32, frames=6, repeats=1, sweep=(0.0, 1.0, 1e9), knobs={"block_size": 2})
    result = run_bench(cfg)
    rows = result["sweep"]
    assert [r["threshold"] for r in rows] == [0.0, 1.0, 1e9]
    assert rows[0]["rel_error_max"] <= 1e-5 and rows[0]["agreement"] == 1.0
    assert rows[2]["mac_reduction"] > rows[0]["mac_reduction"] and rows[2]["rel_error_median"] > 1e-3
    assert all(r["max_abs_diff"] <= 1e-4 for r in rows)
    table = lines(result)
    assert sum(line.split()[0] in ("0", "1", "1e+09") for line in table) == 3


def test_cli_sweep_prints_a_table_and_a_plot(cli, tmp_path):
    r = cli("bench", "--size", "32", "--frames", "6", "--repeats", "1", "--block-size", "2",
            "--sweep", "0.5,2", "--plot", "curve.png")
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.split() and line.split()[0] in ("0.5", "2")]
    assert len(rows) == 2 and len(rows[0].split()) == 7
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_cli_heatmap_reports_pck_agreement(cli):
    r = cli("bench", "--task", "heatmap", "--threshold", "0", "--size", "32", "--frames", "4", "--repeats", "1",
            "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["agreement_kind"] == "pck" and out["agreement"] == 1.0 and out["rel_error_max"] <= 1e-5


@pytest.mark.parametrize("args, text", [
    (("--sweep", "abc"), "--sweep: 'abc' is not a number"),
    (("--sweep", "0.1,,0.2"), "--sweep: '' is not a number"),
    (("--sweep", "0.1,0.1"), "repeated values"),
    (("--sweep", "0.1", "--threshold", "1"), "either a threshold (or a target) or a sweep"),
    (("--plot", "x.png"), "a plot draws a sweep"),
    (("--gate", "gumbel", "--sweep", "0.1"), "gate 'gumbel' has no threshold"),
    (("-p", "nokey"), "'nokey' is not KEY=VALUE"),
    (("--video", "missing.mp4"), "missing.mp4: no such video file"),
])
def test_cli_bench_bad_input(cli, args, text):
    one_line_error(cli("bench", *args), text)


def test_parse_helpers():
    assert parse_knobs(["a=1", "b=0.5", "c=true", "d=block"]) == {"a": 1, "b": 0.5, "c": True, "d": "block"}
    assert parse_values("0.01, 0.02,1e-3", "sweep") == (0.01, 0.02, 0.001)
    with pytest.raises(BenchError, match="'nan' is not a number"):
        parse_values("nan", "sweep")


def test_run_compare_dense(cli, tmp_path):
    from gatesearch.export import save_artifact, trial_meta
    from gatesearch.spaces import DataConfig

    trial = TrialConfig(gate="input_norm", knobs={"threshold": 0.0, "block_size": 2})
    meta = trial_meta(trial, metrics={}, data=DataConfig(synthetic={"height": 32, "width": 32}), num_classes=12,
                      frame_shape=(3, 32, 32))
    save_artifact(tmp_path / "art", build_model(trial, 12), meta)
    r = cli("run", "art", "--frames", "6", "--compare-dense", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["rel_error_max"] <= 1e-5 and out["agreement"] == 1.0 and out["dense_latency_ms_per_frame"] > 0
    # the speedup is the ratio of the medians printed beside it, not of sums a slow first frame decides
    assert out["speedup"] == pytest.approx(out["dense_latency_ms_per_frame"] / out["latency_ms_per_frame"])
    r = cli("run", "art", "--frames", "3", "--compare-dense")
    assert r.exit_code == 0 and "dense twin:" in r.output and "top1 agreement 1.000" in r.output


# -- many streams ----------------------------------------------------------------------------------


def test_offset_streams_start_at_different_frames():
    from gatesearch.objectives.streams import offset_streams

    clip = torch.arange(8.0).reshape(1, 8, 1, 1, 1)
    starts = [int(s[0, 0]) for s in offset_streams(clip, 4)]
    assert starts == [0, 2, 4, 6]


@pytest.mark.parametrize("workers", ["process", "thread"])
def test_cli_bench_streams_reports_frames_per_second_for_both(cli, workers):
    r = cli("bench", "--streams", "2", "--workers", workers, "--size", "32", "--frames", "4", "--repeats", "1",
            "--threshold", "1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["streams"] == 2 and out["workers"] == workers and out["threads"] == 1
    assert out["dense_fps"] > 0 and out["gated_fps"] > 0
    assert out["speedup"] == pytest.approx(out["gated_fps"] / out["dense_fps"], rel=0.5)  # a median of ratios


def test_cli_run_streams(cli, tmp_path):
    from gatesearch.export import save_artifact, trial_meta
    from gatesearch.spaces import DataConfig

    trial = TrialConfig(gate="input_norm", knobs={"threshold": 0.5, "block_size": 2})
    meta = trial_meta(trial, metrics={}, data=DataConfig(synthetic={"height": 32, "width": 32}), num_classes=12,
                      frame_shape=(3, 32, 32))
    save_artifact(tmp_path / "art", build_model(trial, 12), meta)
    r = cli("run", "art", "--frames", "4", "--streams", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["streams"] == 2 and out["frames_per_stream"] == 4 and out["dense_fps"] > 0 and out["gated_fps"] > 0
    one_line_error(cli("run", "art", "--streams", "0"), "--streams must be at least 1")


def test_cli_bench_streams_zero(cli):
    one_line_error(cli("bench", "--streams", "0"), "streams must be at least 1, got 0")


class _Broken(torch.nn.Module):
    def stream(self, clip, *, reset_every=None):
        raise ValueError("broken on purpose")


@pytest.mark.parametrize("workers", ["process", "thread"])
def test_a_failing_stream_worker_is_an_error_not_a_hang(workers):
    from gatesearch.objectives.streams import stream_throughput

    with pytest.raises(RuntimeError, match="failed"):
        stream_throughput({"broken": _Broken()}, [torch.zeros(1, 2, 3, 8, 8)] * 2, reset_every=None,
                          workers=workers, repeats=1)


# -- calibrated thresholds in the bench ------------------------------------------------------------


def test_cli_target_density_reports_the_per_layer_thresholds(cli):
    r = cli("bench", "--target-density", "0.25", "--block-size", "2", "--size", "32", "--frames", "6", "--repeats",
            "1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    layers = out["calibration"]["layers"]
    assert out["calibration"]["target"] == "density" and len(layers) == 5
    assert all(abs(layer["measured"] - 0.25) <= 0.05 for layer in layers.values())
    assert len({layer["threshold"] for layer in layers.values()}) > 1
    assert out["mean_density"] == pytest.approx((1 + 5 * 0.25) / 6, abs=0.05)  # the reference frame is dense


def test_cli_sweep_of_error_targets(cli):
    r = cli("bench", "-p", "calibrate=error", "--sweep", "0.02,0.2", "--block-size", "2", "--size", "32",
            "--frames", "4", "--repeats", "1")
    assert r.exit_code == 0, r.output
    assert "error 0.02" in r.output and "error 0.2" in r.output and "per-layer ε" in r.output
    assert r.output.count("backbone.stem.0") == 1  # one row per layer, one column per target


@pytest.mark.parametrize("args, text", [
    (("--target-density", "0.3", "--threshold", "1"), "either a threshold or a calibration target"),
    (("--target-density", "0.3", "--target-error", "0.1"), "give one target"),
    (("--target-density", "1.5"), "the threshold is the target density, in (0, 1]"),
    (("--gate", "gumbel", "--target-error", "0.1"), "does not take 'calibrate'"),
    (("-p", "calibrate=speed"), "calibrate: 'speed' is not one of off, density, error"),
])
def test_cli_bad_targets(cli, args, text):
    one_line_error(cli("bench", *args), text)
