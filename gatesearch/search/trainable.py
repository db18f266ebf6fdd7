"""What runs in a Ray worker for one trial (``tune_trainable``), and where a trial's files are found again.

A trial's folder under ``<workdir>/ray/<experiment>/`` is named by its Tune id alone (``trial_dirname``), so a
resumed search finds an interrupted trial's last checkpointed epoch from the id (``last_state``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gatesearch.spaces import DataConfig, EvalConfig, TrialConfig
from gatesearch.spaces.objectives import LatencyTarget

from .dense import DenseStart, model_key
from .dominance import EPOCH, EPOCHS
from .study import RESUME_FROM


def tune_trainable(config: dict, *, data: DataConfig, evaluation: EvalConfig, threads: int,
                   starts: dict[str, DenseStart], share_weights: bool, plugins: tuple[str, ...],
                   gates: dict[str, type] | None = None, search_id: str | None = None,
                   latency: LatencyTarget = LatencyTarget(), probe_clips: int = 0) -> None:
    """Runs inside a Ray worker: one trial from the search's dense start; a report per epoch it trains
    (``epoch``, ``epochs``, ``train_loss`` and, with ``probe_clips``, what early stopping ranks), then a final
    report holding every objective (with the quality drop and speedup against the dense baseline) and the model
    files as its checkpoint. ``gates`` are the searched gates' classes, registered here when the worker does not
    know them (a gate defined in the driver's script); ``latency.resource`` names the Ray node the latency is
    measured on."""
    import torch
    from ray import tune

    from gatesearch.data.source import frame_shape, num_classes
    from gatesearch.export import trial_meta, write_files
    from gatesearch.objectives.device import DeviceLock
    from gatesearch.plugins import load_plugins
    from gatesearch.policies import adopt
    from gatesearch.search.checkpoint import LONG_TRIAL_EPOCHS, TrainState
    from gatesearch.search.target import TargetMeter, artifact_files
    from gatesearch.search.trial import run_trial

    load_plugins(plugins)  # before the config is read: a plugin may register the trial's backbone or gate
    adopt(gates or {})
    torch.set_num_threads(threads)
    trial = TrialConfig.from_dict(config["trial"])
    trial_id = tune.get_context().get_trial_id()
    start = starts.get(model_key(trial.backbone, trial.width))
    shared = start if start and share_weights else None

    def meta(metrics: dict) -> dict:
        return trial_meta(trial, metrics=metrics, data=data, num_classes=num_classes(data),
                          frame_shape=frame_shape(data), trial_id=trial_id, search_id=search_id,
                          weights=shared.source if shared else None, plugins=plugins)

    meter = None
    if latency.resource:
        meter = TargetMeter(latency.resource, lambda model: artifact_files(model, meta({})), threads=latency.threads,
                            gates=gates)
    # a trial continuing an interrupted one starts from its last epoch (from scratch if that state is unreadable)
    resume = TrainState.load(Path(config[RESUME_FROM])) if config.get(RESUME_FROM) else None
    saved: list[Path] = []  # the state the next per-epoch report carries as its checkpoint

    def save_state(state: TrainState) -> None:
        saved.append(Path(tempfile.mkdtemp(prefix="gatesearch-state-")))
        state.save(saved[-1])

    def report_epoch(epoch: int, metrics: dict) -> None:
        report = {EPOCH: epoch + 1, EPOCHS: trial.epochs, **metrics}
        if not saved:
            tune.report(report)
            return
        folder = saved.pop()
        try:
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    lock = DeviceLock()
    try:
        outcome = run_trial(trial, data, evaluation, start=shared.state if shared else None,
                            baseline=start.baseline if start else None, lock=lock,
                            latency_threads=len(os.sched_getaffinity(0)), meter=meter, probe_clips=probe_clips,
                            on_epoch=report_epoch, resume=resume,
                            save_state=save_state if trial.epochs >= LONG_TRIAL_EPOCHS else None)
    finally:
        lock.close()
    with tempfile.TemporaryDirectory() as tmp:
        write_files(Path(tmp), outcome.model, meta(outcome.metrics))
        tune.report(outcome.metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def trial_dirname(trial) -> str:
    """A trial's folder is named by its id alone, so its checkpoints are found again from the id."""
    return trial.trial_id


def last_state(workdir: Path, tune_id: str) -> tuple[Path, int] | None:
    """The last complete training state a trial checkpointed (its folder is named by its id) and its epoch."""
    from .checkpoint import latest_checkpoint

    for trial_dir in (workdir / "ray").glob(f"*/{tune_id}"):
        found = latest_checkpoint(trial_dir)
        if found is not None:
            return found[0], found[1].epoch
    return None


__all__ = ["last_state", "trial_dirname", "tune_trainable"]
