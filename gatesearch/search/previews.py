"""Mask previews of the Pareto-optimal trials, logged to their MLflow runs.

A user choosing between two models of the front gets, beside their numbers, the picture Skip-Convolutions opens
with (Fig. 2-3): where each computes and where it skips on a held-out clip (``viz.masks``), and its density per
layer over the clip. Gates without spatial masks (D-STEP, VA-RED²) get the density plot only; a dense trial,
with no gate, gets nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from gatesearch.spaces import DataConfig, EvalConfig

from .tracking import Tracker

FOLDER = "masks"  # where the preview goes among a trial run's artifacts


def log_previews(tracker: Tracker, front: list[dict], *, data: DataConfig, evaluation: EvalConfig,
                 out: Path) -> list[str]:
    """For each row of the front (with its ``run_id``): stream one held-out clip through the trial's logged
    model, write the preview under ``out/<trial id>/`` and log it to the run; returns the trial ids done."""
    from gatesearch.data.source import load_clips
    from gatesearch.export import load_artifact
    from gatesearch.export.stream import Stream
    from gatesearch.viz.masks import MaskRecorder, write_masks

    if not front:
        return []
    clip = load_clips(data, split="val", frames=evaluation.frames, count=1)["clip"][0]  # (T, 3, H, W)
    done = []
    for row in front:
        run = tracker.client.get_run(row["run_id"])
        with tempfile.TemporaryDirectory() as tmp:
            artifact = load_artifact(tracker.download_model(run, Path(tmp)))
        with Stream(artifact, reset_every=evaluation.reset_every(artifact.trial.clip_length) or 0) as stream:
            if not stream.gated_layers():  # the dense network: no gate to draw
                continue
            recorder = MaskRecorder(stream)
            stream.run(clip, after_step=recorder.add)
        folder = out / row["trial_id"]
        folder.mkdir(parents=True, exist_ok=True)
        title = f"{row['trial_id']} {artifact.trial.gate}: quality {row['quality']:.3f}"
        paths = write_masks(recorder.result(), folder, title=title, video=False, sheet=bool(recorder.layers))
        for kind in ("sheet", "density"):
            if kind in paths:
                tracker.log_file(row["run_id"], paths[kind], FOLDER)
        done.append(row["trial_id"])
    return done
