"""The CLI on bad input: one line, non-zero exit, nothing half-written."""

import json

import pytest


def one_line_error(result, text):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert text in lines[0], lines[0]


def test_list(cli):
    r = cli("list")
    assert r.exit_code == 0
    assert "tiny" in r.output and "input_norm" in r.output and "threshold" in r.output


@pytest.mark.parametrize("yaml_text, text", [
    ("trails: 3\n", "trails: unknown key"),
    ("space:\n  gate: [dense, gumbal]\n", "unknown gate 'gumbal'"),
    ("space:\n  gate: dense\n  threshold: 0.1\n", "space.threshold: not taken by any searched gate"),
    ("space:\n  block_size: [3]\n", "space.block_size"),
    ("space: [1, 2\n", "not valid YAML"),
    ("", "empty config"),
    ("# nothing but a comment\n", "empty config"),
])
def test_search_bad_config(cli, tmp_path, yaml_text, text):
    (tmp_path / "c.yaml").write_text(yaml_text)
    one_line_error(cli("search", "c.yaml"), text)
    assert not (tmp_path / "gatesearch_runs").exists()


def test_search_missing_config(cli, tmp_path):
    one_line_error(cli("search", "nope.yaml"), "nope.yaml: no such file")
    assert not (tmp_path / "gatesearch_runs").exists()


def test_pareto_and_export_without_store(cli):
    one_line_error(cli("pareto"), "no search has been recorded yet")
    one_line_error(cli("export", "abc123", "--out", "x"), "no search has been recorded yet")


def test_export_needs_a_destination(cli):
    one_line_error(cli("export", "abc123"), "nothing to do: give --out FOLDER, --register NAME or both")


def test_run_missing_and_foreign_artifact(cli, tmp_path):
    one_line_error(cli("run", "missing"), "no such artifact folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "gatesearch.json").write_text(json.dumps({"format": "someone-else"}))
    one_line_error(cli("run", "foreign"), "foreign format")


def test_run_corrupt_video(cli, tmp_path):
    from gatesearch.export import save_artifact, trial_meta
    from gatesearch.models import build_model
    from gatesearch.spaces import DataConfig, TrialConfig

    trial = TrialConfig(gate="dense")
    meta = trial_meta(trial, metrics={}, data=DataConfig(), num_classes=12, frame_shape=(3, 64, 64))
    save_artifact(tmp_path / "art", build_model(trial, 12), meta)
    (tmp_path / "bad.mp4").write_bytes(b"\x00not a video" * 100)
    one_line_error(cli("run", "art", "--video", "bad.mp4"), "bad.mp4")
    r = cli("run", "art", "--frames", "6", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["frames"] == 6 and summary["mean_density"] == 1.0


def test_bench_json_keys(cli):
    r = cli("bench", "--gate", "input_norm", "--threshold", "1.0", "--block-size", "2", "--size", "32",
            "--frames", "6", "--repeats", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert {"dense_ms", "gated_ms", "speedup", "mac_reduction", "efficiency", "max_abs_diff"} <= set(out)
    assert out["max_abs_diff"] <= 1e-4 and out["mac_reduction"] >= 1.0


def test_bench_layer_json(cli):
    r = cli("bench", "--layer", "--channels", "8", "--layer-size", "16", "--block-size", "4", "--density", "0.25",
            "--repeats", "20", "--json")
    assert r.exit_code == 0, r.output
    (out,) = json.loads(r.output.strip().splitlines()[-1])["layer"]
    assert out["max_abs_diff"] <= 1e-4 and out["per_layer"]["max_abs_diff"] <= 1e-4
    # both paths fired exactly the 4 of 16 blocks the residual was made to wake (the frame step: every frame)
    assert out["density"] == 0.25 and out["per_layer"]["density"] == 0.25


def test_bench_layer_table(cli):
    r = cli("bench", "--layer", "--channels", "8", "--layer-size", "16", "--density", "0.25", "--repeats", "20")
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.output.splitlines() if line.split()[:1] in (["8"], ["4"])]
    assert [(row[0], row[2]) for row in rows] == [("8", "frame"), ("8", "per-layer"), ("4", "frame"),
                                                  ("4", "per-layer")]


def test_bench_bad_param(cli):
    one_line_error(cli("bench", "--gate", "input_norm", "-p", "beta=1"), "does not take 'beta'")
    one_line_error(cli("bench", "--gate", "input_norm", "-p", "reference=last"),
                   "gate 'input_norm': reference: 'last' is not one of frame, block")


def test_bench_block_reference_option(cli):
    r = cli("bench", "--gate", "input_norm", "--threshold", "0.05", "--block-size", "2", "-p", "reference=block",
            "-p", "per_value=true", "--size", "32", "--frames", "6", "--repeats", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["max_abs_diff"] <= 1e-4 and out["mac_reduction"] > 1.0
