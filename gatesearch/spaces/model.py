"""The ``model:`` section of a search: which trained weights every trial starts from, and how gates train.

Train once, gate many (Once-for-All, Cai et al. 2020: specialising a shared trained network is cheap). A search
starts from one trained dense network per (backbone, width): the user's weights, or, without them, a dense
network the search trains once and caches by content (``search.dense``). Every trial loads those weights; gates
whose knobs act at inference only (Skip-Conv's norm gates: ε, Habibian et al. 2021, Eq. 5 and 7) then train not at
all, gates with parameters of their own (Gumbel gates, D-STEP's policy networks, VA-RED²'s gates) fine-tune.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import SpaceError
from .sections import at_least, section, typed


@dataclass(frozen=True, kw_only=True)
class DenseTraining:
    """The one training of the dense network: from random weights when the search has none, or of the task's
    head (with the whole network) when the given weights have no head."""

    epochs: int = 8  # passes over the training clips
    lr: float = 5e-3  # AdamW peak learning rate (one-cycle schedule)
    batch_size: int = 8  # clips per optimisation step
    clip_length: int = 4  # frames per training clip


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    weights: str | None = None  # trained weights (safetensors or a PyTorch state dict); None: trained once here
    prefix_map: dict[str, str | None] = field(default_factory=dict)  # renames the file's keys; null drops a key
    train: DenseTraining = field(default_factory=DenseTraining)  # the dense training, when one is needed
    finetune_epochs: int = 2  # gates with parameters of their own fine-tune this long from the shared weights
    finetune_all: bool = False  # true: every gate fine-tunes (norm gates too), not only those with parameters
    from_scratch: bool = False  # true: no shared weights; every trial trains from random weights for space.epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trial_epochs(self, fine_tunes: bool) -> int | None:
        """Epochs a trial trains, given whether its gate has parameters of its own; None: the space samples them
        (``from_scratch``)."""
        if self.from_scratch:
            return None
        return self.finetune_epochs if fine_tunes or self.finetune_all else 0


def parse_model(raw: Any) -> ModelConfig:
    """Validate the ``model:`` section; a weights path becomes absolute (trials run in other processes)."""
    if raw is None:
        return ModelConfig()
    if not isinstance(raw, dict):
        raise SpaceError(f"model: expected a mapping, got {type(raw).__name__}")
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in raw:
        if key not in known:
            raise SpaceError(f"model.{key}: unknown key; known: {', '.join(known)}")
    values: dict[str, Any] = {}
    weights = raw.get("weights")
    if weights is not None:
        if not isinstance(weights, str) or not weights:
            raise SpaceError(f"model.weights: expected a file path, got {weights!r}")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SpaceError(f"model.weights: {path}: no such file")
        values["weights"] = str(path.resolve())
    prefix_map = raw.get("prefix_map") or {}
    if not isinstance(prefix_map, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in prefix_map.items()):
        raise SpaceError("model.prefix_map: expected a mapping of key prefix -> new prefix (or null to drop it)")
    if prefix_map and weights is None:
        raise SpaceError("model.prefix_map: only used with model.weights")
    values["prefix_map"] = dict(prefix_map)
    values["train"] = _dense_training(raw.get("train"))
    hints = typing.get_type_hints(ModelConfig)
    for key in ("finetune_epochs", "finetune_all", "from_scratch"):
        if key in raw:
            values[key] = typed(raw[key], hints[key], f"model.{key}")
    at_least(values.get("finetune_epochs", 0), 0, "model.finetune_epochs")
    cfg = ModelConfig(**values)
    if cfg.from_scratch and cfg.weights:
        raise SpaceError("model.from_scratch: trials train from random weights, so model.weights would be unused")
    return cfg


def _dense_training(raw: Any) -> DenseTraining:
    train = section(DenseTraining, raw, "model.train", minimum={"epochs": 1, "batch_size": 1})
    if train.lr <= 0:
        raise SpaceError(f"model.train.lr: must be > 0, got {train.lr}")
    if train.clip_length < 2:
        raise SpaceError("model.train.clip_length: must be >= 2 (motion needs two frames)")
    return train


__all__ = ["DenseTraining", "ModelConfig", "parse_model"]
