"""Per-epoch training state of a long trial, so a resumed search continues it instead of training it again.

A trial that trains for ``LONG_TRIAL_EPOCHS`` epochs or more saves, after each epoch but the last, everything
its next epoch depends on: the weights (gates included), the optimiser's moments, the learning-rate schedule's
position and both random generators (the shuffling one and torch's global one, which stochastic gates draw
from). Continuing from it gives the weights an uninterrupted run would have. The state goes to Ray Tune as the
checkpoint of the trial's per-epoch report (``tune.report(..., checkpoint=...)``), so Tune stores it with the
trial; when the search is resumed, the interrupted trial's parameters are queued in the Optuna study with the
path of its last checkpoint, and the trial that takes them starts from there.

Files, never unpickled: ``state.safetensors`` (every tensor) and ``state.json`` (everything else, with the
tensors' sha256), written last so that a checkpoint cut short by a killed process reads as absent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LONG_TRIAL_EPOCHS = 4  # a trial that trains this many epochs or more checkpoints each epoch
TENSORS = "state.safetensors"
META = "state.json"
FORMAT = "gatesearch-train-state/1"


@dataclass(frozen=True, kw_only=True)
class TrainState:
    """Training after ``epoch`` epochs (``loss``: that epoch's mean), as nested state dicts."""

    epoch: int
    loss: float
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator: torch.Tensor  # the shuffling generator's state
    torch_rng: torch.Tensor  # torch's global generator's state

    @classmethod
    def capture(cls, *, epoch: int, loss: float, model, optimizer, scheduler, generator) -> TrainState:
        return cls(epoch=epoch, loss=loss, model=_detached(model.state_dict()),
                   optimizer=_detached(optimizer.state_dict()), scheduler=_detached(scheduler.state_dict()),
                   generator=generator.get_state(), torch_rng=torch.get_rng_state())

    def fits(self, model, optimizer) -> bool:
        """Whether this state lines up with ``model`` and ``optimizer``: the same weights and the same optimiser
        groups (a state saved by another version, e.g. before a gate's weights got their own learning rate,
        does not, and loading it would fail half-way)."""
        own = model.state_dict()
        saved_groups = [len(g["params"]) for g in self.optimizer.get("param_groups", [])]
        return (set(self.model) == set(own) and all(self.model[k].shape == own[k].shape for k in own)
                and saved_groups == [len(g["params"]) for g in optimizer.param_groups])

    def restore(self, *, model, optimizer, scheduler, generator) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        generator.set_state(self.generator)
        torch.set_rng_state(self.torch_rng)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors: dict[str, torch.Tensor] = {}
        meta = {"format": FORMAT, "epoch": self.epoch, "loss": self.loss,
                **{name: _split(getattr(self, name), name, tensors)
                   for name in ("model", "optimizer", "scheduler", "generator", "torch_rng")}}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / TENSORS))
        meta["sha256"] = hashlib.sha256((folder / TENSORS).read_bytes()).hexdigest()
        (folder / META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> TrainState | None:
        """The state saved in ``folder``, or None when it is missing, cut short or not one of ours."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / META).read_text())
            data = (folder / TENSORS).read_bytes()
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        tensors = load_file(str(folder / TENSORS))
        parts = {name: _join(meta[name], tensors) for name in ("model", "optimizer", "scheduler", "generator",
                                                                "torch_rng")}
        return cls(epoch=int(meta["epoch"]), loss=float(meta["loss"]), **parts)


def latest_checkpoint(trial_dir: Path) -> tuple[Path, TrainState] | None:
    """The trial's last complete training state among its Ray Tune checkpoints (``checkpoint_NNNNNN``)."""
    for folder in sorted(Path(trial_dir).glob("checkpoint_*"), reverse=True):
        state = TrainState.load(folder)
        if state is not None:
            return folder, state
    return None


def _detached(obj: Any) -> Any:
    """A deep copy of a state dict with its tensors cloned off the live objects."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


def _split(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``obj``: tensors go to ``tensors`` (named by their path), tuples and non-string keys are marked."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _split(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state at {key}: cannot store a {type(obj).__name__}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _join(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


__all__ = ["LONG_TRIAL_EPOCHS", "TrainState", "latest_checkpoint"]
