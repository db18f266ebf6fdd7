"""The ``gatesearch`` command: a thin layer that parses, builds a config and calls the library."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

WORKDIR_HELP = "Folder holding the MLflow store, the Optuna study and Ray results."
BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def user_errors(fn):
    """Turn expected bad-input errors into one line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from gatesearch.backbones import WeightsError
        from gatesearch.bench import BenchError
        from gatesearch.data import VideoDecodeError
        from gatesearch.data.folder import DatasetError
        from gatesearch.export import ArtifactError
        from gatesearch.plugins import PluginError
        from gatesearch.registry import UnknownNameError
        from gatesearch.search.localray import RayStartError
        from gatesearch.search.preflight import ServiceError
        from gatesearch.search.record import SearchBusy
        from gatesearch.search.tracking import NotFoundError
        from gatesearch.spaces import SpaceError

        try:
            return fn(*args, **kwargs)
        except (SpaceError, ArtifactError, NotFoundError, VideoDecodeError, DatasetError, UnknownNameError,
                WeightsError, PluginError, BenchError, ServiceError, RayStartError, SearchBusy) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def tracking_options(fn):
    fn = click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                      help="MLflow tracking URI (default: SQLite store in the work folder).")(fn)
    fn = click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default="gatesearch_runs",
                      show_default=True, help=WORKDIR_HELP)(fn)
    return fn


def _tracker(workdir: Path, tracking_uri: str | None):
    from gatesearch.search.engine import set_env_defaults
    from gatesearch.search.tracking import Tracker, default_tracking_uri

    set_env_defaults()
    uri = tracking_uri or default_tracking_uri(workdir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise click.ClickException(f"no search has been recorded yet ({uri} does not exist); "
                                   "run `gatesearch search` first")
    return Tracker(uri)


def plugin_option(fn):
    return click.option("--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE",
                        help="User code that registers backbones or gates (repeatable).")(fn)


def _load_plugins(plugins) -> None:
    from gatesearch.plugins import load_plugins

    load_plugins(plugins)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gatesearch")
def main() -> None:
    """Find the best gated (dynamic) version of a video CNN for this device."""


@main.command()
@click.argument("config")
@click.option("--trials", type=int, help="Override the number of trials.")
@click.option("--max-concurrent", type=int, help="Override how many trials run at once.")
@click.option("--name", help="Override the search name (MLflow experiment).")
@click.option("--seed", type=int, help="Override the sampler seed.")
@click.option("--objective", type=click.Choice(["latency", "macs"]), help="Second objective beside quality.")
@plugin_option
@tracking_options
@click.option("--ray-address", envvar="RAY_ADDRESS", help="Join an existing Ray cluster instead of starting one.")
@click.option("--latency-on", metavar="RESOURCE",
              help="Measure latency on the Ray node carrying this custom resource (the target device, started with "
                   "ray start --resources '{\"RESOURCE\": 1}'); overrides latency.resource.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line.")
@user_errors
def search(config, trials, max_concurrent, name, seed, objective, plugins, workdir, tracking_uri, ray_address,
           latency_on, as_json):
    """Run a multi-objective search described by CONFIG (a YAML file, or `quick` for the built-in one)."""
    from gatesearch.search.engine import RunOptions, run_search
    from gatesearch.search.recorder import format_params
    from gatesearch.spaces import load_search_config

    path = Path(config)
    if not path.exists() and (BUILTIN_CONFIGS / f"{config}.yaml").exists():
        path = BUILTIN_CONFIGS / f"{config}.yaml"
    cfg = load_search_config(path, trials=trials, max_concurrent=max_concurrent, name=name, seed=seed,
                             objective=objective, plugins=plugins)
    if latency_on:
        import dataclasses

        cfg = dataclasses.replace(cfg, latency=dataclasses.replace(cfg.latency, resource=latency_on))
    opts = RunOptions(workdir=workdir, tracking_uri=tracking_uri, ray_address=ray_address)
    _report(lambda: run_search(cfg, opts, echo=_err, progress=_progress(as_json)), as_json, format_params)


@main.command()
@click.argument("search_id", required=False)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default="gatesearch_runs",
              show_default=True, help=WORKDIR_HELP)
@click.option("--ray-address", envvar="RAY_ADDRESS", help="Join an existing Ray cluster instead of starting one.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line.")
@user_errors
def resume(search_id, workdir, ray_address, as_json):
    """Continue a stopped or killed search (SEARCH_ID, or the latest unfinished one) with its own config."""
    from gatesearch.search.engine import NothingToResume, RunOptions, resume_search
    from gatesearch.search.recorder import format_params

    opts = RunOptions(workdir=workdir, ray_address=ray_address)
    try:
        _report(lambda: resume_search(search_id, opts, echo=_err, progress=_progress(as_json)), as_json,
                format_params)
    except NothingToResume as e:
        click.echo(str(e))


def _err(line: str) -> None:
    click.echo(line, err=True)


def _report(drive, as_json: bool, format_params) -> None:
    """Run a search to its end and print its summary; a search that stopped early exits with its code."""
    from gatesearch.search.engine import SearchStopped

    try:
        summary = drive()
    except SearchStopped as e:
        if as_json:
            _emit_json(e.summary)
        _err(str(e))
        sys.exit(e.exit_code)
    if as_json:
        _emit_json(summary)
        return
    click.echo(f"\nsearch {summary['search_id']}: {summary['trials_completed']} trials completed, "
               f"{summary['trials_pruned']} stopped early, {summary['trials_failed']} failed in "
               f"{summary['wall_s']:.0f} s")
    if summary["hypervolume"] is not None:
        click.echo(f"hypervolume {summary['hypervolume']:.4g} (reference {summary['hypervolume_reference']})")
    _print_front(summary["pareto"], format_params)
    if summary["pareto_plot"]:
        click.echo(f"plot: {summary['pareto_plot']}")
    click.echo(f"MLflow: {summary['tracking_uri']}")
    click.echo(f"browse: mlflow ui --backend-store-uri {summary['tracking_uri']}, then open {summary['mlflow_ui']}")


def _progress(as_json: bool):
    """A live display on a terminal; plain lines (the default) for pipes, logs and ``--json``."""
    if as_json or not sys.stderr.isatty():
        return None
    from gatesearch.search.progress import LiveProgress

    return LiveProgress()


def _print_front(rows, format_params) -> None:
    """The front as a table: quality, its drop against dense with the 95 % interval, latency and speedup."""
    if not rows:
        click.echo("no Pareto-optimal trials")
        return
    click.echo(f"{'trial':<14} {'gate':<12} {'quality':>7} {'drop':>7} {'95% interval':>17} {'ms/frame':>9} "
               f"{'speedup':>7} {'MMACs':>8}  params")
    for r in rows:
        drop, ci, speedup = r.get("quality_drop"), r.get("quality_drop_ci"), r.get("speedup")
        click.echo(f"{r['trial_id']:<14} {r['gate']:<12} {r['quality']:>7.3f} "
                   f"{'' if drop is None else f'{drop:+.3f}':>7} "
                   f"{'' if not ci else f'[{ci[0]:+.3f}, {ci[1]:+.3f}]':>17} {r['latency_ms']:>9.2f} "
                   f"{'' if speedup is None else f'{speedup:.2f}x':>7} {r['macs'] / 1e6:>8.2f}  "
                   f"{format_params(r['params'])}")


@main.command()
@click.argument("search_id", required=False)
@click.option("--max-latency-ms", type=float, help="Only trials at most this slow (ms per frame).")
@click.option("--max-quality-drop", type=float, help="Only trials at most this far below the dense network.")
@click.option("--max-macs", type=float, help="Only trials spending at most this many MACs per frame.")
@click.option("--min-quality", type=float, help="Only trials at least this good.")
@tracking_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def pareto(search_id, max_latency_ms, max_quality_drop, max_macs, min_quality, workdir, tracking_uri, as_json):
    """Print the Pareto-optimal trials of the latest search (or of SEARCH_ID); with budgets, the front of the trials
    within them (as the search's own constraints would have made it)."""
    from gatesearch.search.pareto import front_within
    from gatesearch.search.recorder import format_params
    from gatesearch.spaces.objectives import parse_constraints

    budget = {"max_latency_ms": max_latency_ms, "max_quality_drop": max_quality_drop, "max_macs": max_macs}
    constraints = parse_constraints({k: v for k, v in budget.items() if v is not None})
    tracker = _tracker(workdir, tracking_uri)
    run = tracker.search_run(search_id)
    rows = tracker.pareto_rows(run)
    if constraints.named() or min_quality is not None:
        rows = front_within(tracker.trial_rows(run) or rows, constraints, min_quality=min_quality)
    sid = run.data.tags.get("gatesearch.search_id")
    if as_json:
        _emit_json({"search_id": sid, "pareto": rows})
        return
    click.echo(f"search {sid}")
    _print_front(rows, format_params)


@main.command()
@click.argument("trial_id")
@click.option("--out", "out", type=click.Path(path_type=Path), help="Folder to write the artifact into.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--register", metavar="NAME",
              help="Register the trial's MLflow logged model in the Model Registry as NAME "
                   "(a new version if NAME exists).")
@plugin_option
@tracking_options
@user_errors
def export(trial_id, out, force, register, plugins, workdir, tracking_uri):
    """Write TRIAL_ID's gated model as a self-contained artifact (safetensors + JSON), and/or register it."""
    import tempfile

    from gatesearch.export import load_artifact, save_artifact
    from gatesearch.search.tracking import SEARCH_TAG

    if out is None and register is None:
        raise click.ClickException("nothing to do: give --out FOLDER, --register NAME or both")
    _load_plugins(plugins)
    tracker = _tracker(workdir, tracking_uri)
    run = tracker.trial_run(trial_id)
    if run.info.status != "FINISHED":
        raise click.ClickException(f"trial {trial_id!r} did not finish ({run.info.status}); nothing to export")
    if out is not None:
        with tempfile.TemporaryDirectory() as tmp:
            artifact = load_artifact(tracker.download_model(run, Path(tmp)))  # checked before anything is written
            meta = {**artifact.meta, "trial_id": trial_id, "search_id": run.data.tags.get(SEARCH_TAG)}
            meta.pop("format", None)
            meta.pop("gatesearch_version", None)
            save_artifact(out, artifact.model, meta, overwrite=force)
        click.echo(f"exported {trial_id} ({artifact.trial.gate}) to {out}")
    if register is not None:
        version = tracker.register(run, register)
        click.echo(f"registered {trial_id} as {version.name} version {version.version}")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--video", type=click.Path(path_type=Path), help="Video file to stream (default: a synthetic clip).")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Stop after this many frames (synthetic default: 32).")
@click.option("--reset-every", type=click.IntRange(min=0), default=None,
              help="Recompute the reference frame densely every N frames "
                   "(default: the trial's clip length; 0 = only the first frame).")
@click.option("--compare-dense", is_flag=True,
              help="Run the dense twin (same weights, no gate) beside it: its latency, the speedup, and how far "
                   "the gated output is from the dense one.")
@click.option("--streams", type=int, metavar="N",
              help="Throughput of N independent streams at once (offsets of the clip), one single-threaded worker "
                   "each, beside the dense twin: frames/s of both.")
@click.option("--workers", type=click.Choice(["process", "thread"]), default="process", show_default=True,
              help="With --streams: what runs each stream.")
@click.option("--masks", "masks_out", type=click.Path(file_okay=False, path_type=Path),
              help="Write the gate masks over the frames to this new folder: masks.mp4, masks.png (contact sheet), "
                   "density.png (density per layer over time), masks.json.")
@click.option("--layer", "layers", multiple=True, metavar="NAME",
              help="--masks: a layer to draw (repeatable; default: four spread over the depth).")
@plugin_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line.")
@user_errors
def run(artifact_dir, video, frames, reset_every, compare_dense, streams, workers, masks_out, layers, plugins,
        as_json):
    """Run an exported model over a video stream, frame by frame, with real skipped computation."""
    import itertools

    import gatesearch
    from gatesearch.data import iter_frames
    from gatesearch.data.source import load_clips
    from gatesearch.export import dense_twin
    from gatesearch.export.runner import run_stream, run_streams
    from gatesearch.spaces import DataConfig

    _load_plugins(plugins)
    stream = gatesearch.load(artifact_dir, reset_every=reset_every)
    artifact = stream.artifact
    _, h, w = artifact.meta["frame_shape"]
    if video is not None:
        source = iter_frames(video, size=(h, w))
        if frames:
            source = itertools.islice(source, frames)
    else:
        data = DataConfig(**artifact.meta["data"])  # a held-out clip of the data the model was searched on
        source = iter(load_clips(data, split="val", frames=frames or 32, count=1)["clip"][0])
    if streams is not None:
        if streams < 1:
            raise click.ClickException(f"--streams must be at least 1, got {streams}")
        summary = run_streams(artifact, source, streams=streams, reset_every=stream.reset_every or None,
                              workers=workers)
        if as_json:
            _emit_json(summary)
        else:
            click.echo(f"{streams} streams of {summary['frames_per_stream']} frames, one {workers} each: "
                       f"dense {summary['dense_fps']:.1f} frames/s, gated {summary['gated_fps']:.1f} frames/s, "
                       f"speedup {summary['speedup']:.2f}x")
        return
    recorder = _mask_recorder(stream, layers, masks_out)

    def show(s):
        if not as_json:
            dense_ms = f"  (dense {s.dense_latency_ms:7.2f} ms)" if s.dense_latency_ms is not None else ""
            click.echo(f"frame {s.index:4d}  density {s.density:6.3f}  {s.macs / 1e6:8.2f} MMACs  "
                       f"{s.latency_ms:7.2f} ms{dense_ms}")

    dense = dense_twin(artifact) if compare_dense else None
    with stream:
        summary = run_stream(stream, source, on_frame=show, after_step=recorder.add if recorder else None,
                             dense=dense)
    if recorder is not None:
        from gatesearch.viz.masks import save_masks

        fps = round(video_fps(video)) if video is not None else 8
        paths = save_masks(recorder.result(), masks_out, fps=max(1, fps),
                           title=f"{artifact.trial.gate} {artifact.meta.get('trial_id') or ''}".strip())
        summary["masks"] = {kind: str(path) for kind, path in paths.items()}
    if as_json:
        _emit_json(summary)
        return
    click.echo(f"{summary['frames']} frames: mean density {summary['mean_density']:.3f}, "
               f"{summary['macs_per_frame'] / 1e6:.2f} MMACs/frame "
               f"(dense {summary['dense_macs_per_frame'] / 1e6:.2f}), "
               f"{summary['latency_ms_per_frame']:.2f} ms/frame (median)")
    if dense is not None:
        click.echo(f"dense twin: {summary['dense_latency_ms_per_frame']:.2f} ms/frame (median), speedup "
                   f"{summary['speedup']:.2f}x; output vs dense: relative error median "
                   f"{summary['rel_error_median']:.2e}, max {summary['rel_error_max']:.2e}, "
                   f"{summary['agreement_kind']} agreement {summary['agreement']:.3f}")
    if recorder is not None:
        click.echo(f"masks: {masks_out}")


def _mask_recorder(stream, layers, masks_out):
    """A MaskRecorder for ``run --masks`` (None without it); refuses, before any frame, what it cannot draw."""
    if masks_out is None:
        if layers:
            raise click.ClickException("--layer needs --masks")
        return None
    if masks_out.exists() and any(masks_out.iterdir()):
        raise click.ClickException(f"{masks_out}: already exists")
    if not stream.masks_available():
        raise click.ClickException(f"gate {stream.artifact.trial.gate!r} has no spatial masks to draw "
                                   "(Skip-Conv gates have)")
    from gatesearch.viz.masks import MaskRecorder

    try:
        return MaskRecorder(stream, list(layers))
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def video_fps(path: Path) -> float:
    from gatesearch.data import video_info

    return video_info(path)["fps"] or 8


@main.command()
@click.option("--backbone", default="tiny", show_default=True, help="Backbone registry name.")
@click.option("--gate", default="input_norm", show_default=True, help="Gate registry name.")
@click.option("--task", type=click.Choice(["classification", "heatmap"]), default="classification", show_default=True,
              help="The head, and so the output whose distance from dense is reported.")
@click.option("--threshold", type=float, help="ε of the norm gates.")
@click.option("--block-size", type=int, help="Mask block size b.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Any other gate parameter or option (e.g. -p reference=block -p per_value=true).")
@click.option("--target-density", type=float, metavar="D",
              help="Norm gates: give each layer its own ε so that it computes a fraction D of its outputs on the "
                   "clip (reports the ε found).")
@click.option("--target-error", type=float, metavar="E",
              help="Norm gates: give each layer its own ε so that the error it adds to its output is at most E "
                   "(relative) on the clip.")
@click.option("--sweep", metavar="ε1,ε2,...",
              help="Compare these thresholds in one run against one dense twin: a table, one row per ε.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="With --sweep: write the speed-error curve to this PNG.")
@click.option("--streams", type=int, metavar="N",
              help="Throughput of N independent streams at once (offsets of the clip), one single-threaded worker "
                   "each: frames/s of dense and gated.")
@click.option("--workers", type=click.Choice(["process", "thread"]), default="process", show_default=True,
              help="With --streams: what runs each stream.")
@click.option("--artifact", type=click.Path(path_type=Path),
              help="Bench an exported model (its gate and weights) instead.")
@click.option("--video", type=click.Path(path_type=Path), help="Clip to stream (default: a synthetic clip).")
@click.option("--frames", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=112, show_default=True, help="Frame height and width.")
@click.option("--width", "width_mult", type=float, default=1.0, show_default=True, help="Backbone width multiplier.")
@click.option("--reset-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Dense reference every N frames (0: first only).")
@click.option("--threads", type=click.IntRange(min=1), help="Torch threads for both models (default: all cores).")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--layer", is_flag=True,
              help="Time one conv layer instead: the native frame step and the per-layer path against the best "
                   "dense conv (see --channels, --layer-size, --kernel, --density; --block-size, default 8 and 4).")
@click.option("--channels", type=int, default=64, show_default=True, help="--layer: channels in and out.")
@click.option("--layer-size", type=int, default=56, show_default=True, help="--layer: feature map size.")
@click.option("--kernel", type=int, default=3, show_default=True, help="--layer: kernel size.")
@click.option("--density", type=float, multiple=True, default=(0.1, 0.25), show_default=True,
              help="--layer: fraction of blocks active (repeatable).")
@plugin_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object as the last line.")
@user_errors
def bench(backbone, gate, task, threshold, block_size, params, target_density, target_error, sweep, plot, streams,
          workers, artifact, video, frames, size, width_mult, reset_every, threads, repeats, layer, channels,
          layer_size, kernel, density, plugins, as_json):
    """Time the gated model against the dense one, side by side on the same clip, and say how far its output is."""
    from gatesearch.bench import BenchConfig, gate_knobs, lines, parse_values, run_bench

    _load_plugins(plugins)
    if layer:
        _bench_layer(channels, layer_size, kernel, block_size, density, threads, repeats, as_json)
        return
    knobs = gate_knobs(threshold=threshold, block_size=block_size, params=params, target_density=target_density,
                       target_error=target_error)
    cfg = BenchConfig(backbone=backbone, gate=gate, task=task, knobs=knobs,
                      sweep=parse_values(sweep, "--sweep") if sweep is not None else (), plot=plot,
                      artifact=artifact, video=video, frames=frames, size=size, width=width_mult,
                      reset_every=reset_every or None, threads=threads, repeats=repeats, streams=streams,
                      workers=workers)
    result = run_bench(cfg)
    if as_json:
        _emit_json(result)
    else:
        for line in lines(result):
            click.echo(line)


def _bench_layer(channels, size, kernel, block_size, densities, threads, repeats, as_json) -> None:
    """``bench --layer``: one conv layer, the frame step and the per-layer path against the best dense conv, per
    block size (default 8, then 4) and density."""
    import os

    from gatesearch.ops.bench import bench_layer, layer_table

    results = [bench_layer(channels=channels, size=size, kernel=kernel, block=b, density=d,
                           threads=threads or len(os.sched_getaffinity(0)), repeats=max(repeats, 20))
               for b in ((block_size,) if block_size else (8, 4)) for d in densities]
    if as_json:
        _emit_json({"layer": results})
    else:
        for line in layer_table(results):
            click.echo(line)


@main.command()
@click.option("--quick", is_flag=True, help="The quick profile: smaller sweeps, fewer clips; about 15 minutes on "
                                            "2 cores (same as --profile quick).")
@click.option("--profile", "profile_name", type=click.Choice(["full", "quick", "smoke"]), default=None,
              help="Run size: full (about 15 minutes; the report in docs/fidelity.md), quick, or smoke (every "
                   "finding at toy sizes in a few minutes, for tests; its numbers mean little).  [default: full]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder: a new one, or the folder of an interrupted run (same profile, seed and video) "
                   "to continue it. Default: WORKDIR/fidelity/<profile>-<date>.")
@click.option("--video", type=click.Path(dir_okay=False, path_type=Path),
              help="A real clip to time the gates on (findings 3 and 7: wall-clock on real motion).")
@click.option("--only", help="Comma-separated findings to run (and what they need), e.g. keep_all,dstep_target.")
@click.option("--seed", type=int, help="Override the profile's seed.")
@tracking_options
@user_errors
def fidelity(quick, profile_name, out, video, only, seed, workdir, tracking_uri):
    """Re-run the papers' findings and write a report: finding, paper's number, ours, reproduced or not."""
    import dataclasses
    import shlex
    import time

    from gatesearch.findings import FINDINGS, FidelityOptions, get_profile, run_fidelity

    if quick and profile_name not in (None, "quick"):
        raise click.ClickException(f"--quick and --profile {profile_name} disagree; give one")
    profile = get_profile("quick" if quick else profile_name or "full")
    if seed is not None:
        profile = dataclasses.replace(profile, seed=seed, frame_net=dataclasses.replace(profile.frame_net, seed=seed),
                                      clip_net=dataclasses.replace(profile.clip_net, seed=seed))
    keys = tuple(k.strip() for k in only.split(",") if k.strip()) if only else ()
    for key in keys:
        FINDINGS.get(key)  # an unknown finding: one line listing the known ones
    out = out or workdir / "fidelity" / f"{profile.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = ["gatesearch", "fidelity", "--profile", profile.name]
    for flag, value in (("--video", video), ("--only", only), ("--seed", seed)):
        command += [flag, str(value)] if value is not None else []
    options = FidelityOptions(profile=profile, out=out, workdir=workdir, tracking_uri=tracking_uri, video=video,
                              only=keys, command=shlex.join(command))
    try:
        report = run_fidelity(options, echo=lambda line: click.echo(line, err=True), live=sys.stderr.isatty())
    except FileExistsError as e:
        raise click.ClickException(str(e)) from None
    claims = [c for o in report.outcomes for c in o.finding.claims]
    click.echo(f"{sum(c.reproduced for c in claims)} of {len(claims)} claims reproduced; report: "
               f"{out / 'report.md'}; MLflow run {report.mlflow_run_id}")


@main.group()
def data():
    """Datasets: write the synthetic one to disk, or cut real videos into a video folder."""


@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--clips-per-class", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--frames", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--height", type=click.IntRange(min=16), default=64, show_default=True)
@click.option("--width", type=click.IntRange(min=16), default=64, show_default=True)
@click.option("--shapes", type=click.IntRange(1, 4), default=3, show_default=True)
@click.option("--directions", type=click.Choice(["1", "2", "4", "8"]), default="4", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def synth(out_dir, clips_per_class, frames, height, width, shapes, directions, seed):
    """Write the synthetic dataset to OUT_DIR as a video folder (mp4 files plus centre annotations)."""
    from gatesearch.data import SyntheticConfig
    from gatesearch.data.folder import write_synthetic_folder

    try:
        cfg = SyntheticConfig(frames=frames, height=height, width=width, num_shapes=shapes,
                              num_directions=int(directions), seed=seed)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    total = cfg.num_classes * clips_per_class
    with click.progressbar(length=total, label=f"writing {total} videos", file=sys.stderr) as bar:
        write_synthetic_folder(out_dir, cfg, clips_per_class=clips_per_class, on_video=lambda _: bar.update(1))
    click.echo(f"wrote {total} videos in {cfg.num_classes} classes to {out_dir}")


@data.command()
@click.argument("videos", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The video folder to write (one sub-folder per class).")
@click.option("--class", "classes", multiple=True, metavar="NAME",
              help="The class of each video, in order (repeatable; default: the video's file name).")
@click.option("--frames", type=click.IntRange(min=2), default=16, show_default=True, help="Frames per segment.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Keep one frame in N (lowers the frame rate).")
@click.option("--short-side", type=click.IntRange(min=16), default=128, show_default=True,
              help="Resize segments so that their shorter side is this.")
@click.option("--max-segments", type=click.IntRange(min=1), help="At most this many segments per video.")
@user_errors
def cut(videos, out_dir, classes, frames, every, short_side, max_segments):
    """Cut long VIDEOS into consecutive short segments, a video folder a search can read (data.kind: video_folder)."""
    from gatesearch.data.cut import CutPlan, cut_videos

    plan = CutPlan(frames=frames, every=every, short_side=short_side, max_segments=max_segments)
    written = cut_videos(list(videos), out_dir, plan, classes=list(classes) or None)
    for name, n in written.items():
        click.echo(f"{name}: {n} segments of {frames} frames")
    click.echo(f"wrote {sum(written.values())} videos in {len(written)} classes to {out_dir}")


@main.command(name="list")
def list_cmd():
    """Show the registered backbones and gates."""
    from gatesearch.backbones import BACKBONES
    from gatesearch.policies import POLICIES

    width = max(map(len, [*BACKBONES, *POLICIES]))
    click.echo("backbones:")
    for name in BACKBONES:
        click.echo(f"  {name:<{width}}  {BACKBONES.describe(name)}")
    click.echo("gates:")
    for name in POLICIES:
        params = ", ".join(p.name for p in POLICIES.get(name).params) or "-"
        click.echo(f"  {name:<{width}}  {POLICIES.describe(name)}  [params: {params}]")


if __name__ == "__main__":
    sys.exit(main())
