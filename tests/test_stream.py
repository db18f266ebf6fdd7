"""``gatesearch.load``: the exported model as a stream, what ``gatesearch run`` prints, and the gate masks it draws."""

import json

import pytest
import torch
from click.testing import CliRunner

import gatesearch
from gatesearch.cli import main
from gatesearch.data import SyntheticConfig, make_clip, read_frames, write_video
from gatesearch.export import save_artifact, trial_meta
from gatesearch.models import build_model
from gatesearch.spaces import DataConfig, TrialConfig

DATA = DataConfig(synthetic={"height": 32, "width": 32})
INPUT_NORM = TrialConfig(gate="input_norm", knobs={"threshold": 0.5, "block_size": 2}, clip_length=4)


def export(tmp_path, trial, name="model"):
    model = build_model(trial, 12).eval()
    meta = trial_meta(trial, metrics={}, data=DATA, num_classes=12, frame_shape=(3, 32, 32), trial_id="t1")
    return model, save_artifact(tmp_path / name, model, meta)


@pytest.fixture
def clip_file(tmp_path):
    clip = make_clip(SyntheticConfig(height=32, width=32, frames=12, noise=0.0, camera_motion=0.0, seed=5), 3,
                     "test")["clip"]  # (12, 3, 32, 32)
    path = tmp_path / "clip.mp4"
    write_video(path, clip, fps=10)
    return path


def run_json(*args):
    r = CliRunner().invoke(main, ["run", *map(str, args), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("trial", [
    INPUT_NORM,
    TrialConfig(gate="output_norm", knobs={"threshold": 1.5, "block_size": 4}, clip_length=3, task="heatmap"),
    TrialConfig(backbone="r2plus1d_tiny", gate="vared2", knobs={"search_space_size": 2, "lambda_e": 1.0},
                clip_length=4),
], ids=["classification", "heatmap", "clip-windows"])
def test_load_round_trip_equals_run(tmp_path, clip_file, trial):
    """Stepping the decoded clip through ``gatesearch.load`` gives what ``gatesearch run`` reports, frame for
    frame, and the model's own batched stream."""
    model, folder = export(tmp_path, trial)
    frames = read_frames(clip_file, size=(32, 32))
    printed = run_json(folder, "--video", clip_file)
    with gatesearch.load(folder) as stream:
        outputs = [stream.step(frame) for frame in frames]
        outputs.append(stream.flush())
        summary = stream.summary()
        per_frame = [(s.density, s.macs) for s in stream.stats]
    timing = {"latency_ms_per_frame", "latency_ms_mean"}
    assert {k: v for k, v in summary.items() if k not in timing} == {
        k: v for k, v in printed.items() if k not in timing}
    assert len(per_frame) == len(frames) == printed["frames"]
    with torch.inference_mode():
        reference = model.stream(frames[None], reset_every=trial.clip_length)
    if trial.task == "heatmap":  # per-frame outputs are the stream's
        assert torch.equal(torch.stack(outputs[:-1])[None], reference)
    else:
        assert summary["predicted_class"] == int(reference.argmax(1))


def test_stream_steps_numpy_frames_and_resets(tmp_path, clip_file):
    _, folder = export(tmp_path, INPUT_NORM)
    frames = read_frames(clip_file, size=(32, 32))
    as_uint8 = [(f.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for f in frames]  # (H, W, 3)
    stream = gatesearch.load(folder, reset_every=0)
    first = [stream.step(f) for f in as_uint8[:5]]
    assert [s.index for s in stream.stats] == [0, 1, 2, 3, 4]
    assert stream.density == stream.last.density and stream.stats[0].density == 1.0
    assert first[0].shape == (12,)  # clip logits of the frames so far
    stream.reset()
    again = [stream.step(f) for f in as_uint8[:5]]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # a reset starts a new video
    stream.close()
    with pytest.raises(RuntimeError, match="closed"):
        stream.step(as_uint8[0])


@pytest.mark.parametrize("trial", [
    INPUT_NORM,
    TrialConfig(gate="output_norm", knobs={"threshold": 0.6, "block_size": 1}, clip_length=4),
    TrialConfig(gate="input_norm", knobs={"threshold": 0.05, "block_size": 4, "reference": "block",
                                          "per_value": True}, clip_length=4),
    TrialConfig(gate="gumbel", knobs={"beta": 1.0, "block_size": 2}, clip_length=4),
], ids=["input_norm", "output_norm", "block_reference", "gumbel"])
def test_masks_match_the_recorded_density(tmp_path, clip_file, trial):
    """Each drawn mask is where the layer computed: its mean is the density the layer recorded on that frame."""
    from gatesearch.viz.masks import MaskRecorder

    _, folder = export(tmp_path, trial)
    stream = gatesearch.load(folder)
    recorder = MaskRecorder(stream, count=3)
    assert len(recorder.layers) == 3 and recorder.layers[0] == stream.masks_available()[0]
    with stream:
        stream.run(read_frames(clip_file, size=(32, 32)), after_step=recorder.add)
    rec = recorder.result()
    assert rec.reference_frames == [0, 4, 8]
    for name, masks in rec.masks.items():
        assert masks.dtype == torch.bool and masks.shape[0] == 12
        assert masks.float().mean((1, 2)).tolist() == pytest.approx(rec.density[name], abs=1e-9)
        assert all(masks[t].all() for t in rec.reference_frames)
    if trial.gate != "gumbel":  # (an untrained Gumbel gate may compute everything)
        skipped = [masks[t].float().mean() for masks in rec.masks.values() for t in range(12) if t % 4]
        assert min(skipped) < 1.0  # the gate skipped somewhere: the check above is not all-ones against all-ones


def test_run_masks_writes_video_sheet_and_plot(tmp_path, clip_file, monkeypatch):
    import av

    monkeypatch.chdir(tmp_path)
    _, folder = export(tmp_path, INPUT_NORM)
    out = run_json(folder, "--video", clip_file, "--masks", "masks", "--layer", "backbone.stem.0")
    assert out["masks"]["video"].endswith("masks.mp4")
    video = tmp_path / "masks" / "masks.mp4"
    assert read_frames(video).shape[0] == read_frames(clip_file).shape[0] == 12
    with av.open(str(video)) as container:
        assert container.streams.video[0].codec_context.height >= 160
    for name in ("masks.png", "density.png"):
        assert (tmp_path / "masks" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((tmp_path / "masks" / "masks.json").read_text())
    assert numbers["mask_layers"] == ["backbone.stem.0"] and numbers["frames"] == 12
    assert numbers["mask_density"]["backbone.stem.0"] == pytest.approx(numbers["density"]["backbone.stem.0"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


@pytest.mark.parametrize("trial, args, text", [
    (TrialConfig(gate="dense"), ["--masks", "m"], "gate 'dense' has no spatial masks"),
    (INPUT_NORM, ["--masks", "m", "--layer", "nope"], "no gate mask for layer 'nope'"),
    (INPUT_NORM, ["--layer", "backbone.stem.0"], "--layer needs --masks"),
])
def test_run_masks_refusals(tmp_path, monkeypatch, trial, args, text):
    monkeypatch.chdir(tmp_path)
    export(tmp_path, trial)
    r = CliRunner().invoke(main, ["run", "model", "--frames", "4", *args])
    assert r.exit_code != 0 and text in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "m").exists()


def test_readme_example(tmp_path, clip_file, monkeypatch, capsys):
    """The README's ten-line library example runs as printed, on an exported model and a real mp4."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("<!-- example: tested by tests/test_stream.py::test_readme_example -->")[1]
    code = code.split("```python\n")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    export(tmp_path, INPUT_NORM, name="exported")
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12 and lines[0].startswith("frame 0: class ") and "density 1.00" in lines[0]
