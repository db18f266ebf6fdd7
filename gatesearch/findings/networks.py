"""The trained dense networks the findings share: each is trained once and every gate starts from it.

All three papers gate a trained network (Skip-Convolutions' norm gates need no training at all; its Gumbel gates,
D-STEP and VA-RED² fine-tune it), so every finding about one network starts from the same weights: a difference
between two gates is then the gates', not two trainings'. The training is the search's (issue 15,
``search.dense.cached_dense``): cached in ``<workdir>/dense/<key>/`` under a key of everything the weights depend
on, so a second report, or a report after a search on the same settings, loads the network instead of training it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gatesearch.spaces import DataConfig, TrialConfig


@dataclass(frozen=True, kw_only=True)
class NetworkSpec:
    """A dense network and the synthetic data it is trained and judged on; every field is in the report."""

    backbone: str  # backbone registry name
    task: str  # "heatmap" (per-frame PCK) or "classification" (clip top-1)
    size: int  # frame height and width of the synthetic clips
    width: float = 1.0  # channel-width multiplier
    train_clips: int  # synthetic training clips
    epochs: int  # dense training epochs
    lr: float = 3e-3  # AdamW learning rate of the dense training
    clip_length: int = 4  # T: frames per training clip (the reference period at test, unless a finding varies it)
    val_clips: int  # held-out clips every gate of this network is scored on
    val_frames: int = 16  # frames per held-out clip
    seed: int = 0  # weights, data order (the synthetic clips are fixed by their index)

    def data(self) -> DataConfig:
        return DataConfig(train_clips=self.train_clips, val_clips=self.val_clips,
                          synthetic={"height": self.size, "width": self.size})

    def trial(self, gate: str = "dense", knobs: dict[str, Any] | None = None, **changes: Any) -> TrialConfig:
        """The TrialConfig of this network converted by ``gate`` (``changes``: epochs, lr, clip_length...)."""
        base = TrialConfig(backbone=self.backbone, width=self.width, task=self.task, gate=gate, knobs=knobs or {},
                           clip_length=self.clip_length, epochs=self.epochs, lr=self.lr, seed=self.seed)
        return dataclasses.replace(base, **changes)

    def describe(self) -> str:
        return (f"{self.backbone} (width {self.width:g}, task {self.task}) at {self.size}×{self.size}, trained "
                f"{self.epochs} epochs on {self.train_clips} synthetic clips of {self.clip_length} frames "
                f"(lr {self.lr:g}, seed {self.seed}); judged on {self.val_clips} held-out clips of "
                f"{self.val_frames} frames")


def build_dense(spec: NetworkSpec) -> nn.Module:
    """The dense network of ``spec`` with fresh weights seeded by ``spec.seed``."""
    from gatesearch.data.source import num_classes
    from gatesearch.models import build_model

    return build_model(spec.trial(), num_classes(spec.data()))


def trained_dense(spec: NetworkSpec, workdir: Path):
    """The trained dense network of ``spec``: from the work folder's train-once cache, or trained now and stored
    there (``search.dense.CachedDense``: the state, its cache entry, whether it was trained just now)."""
    from gatesearch.search.dense import DenseCache, cached_dense

    return cached_dense(spec.trial(), spec.data(), DenseCache(Path(workdir) / "dense"))


def convert(dense: nn.Module, gate: str, knobs: dict[str, Any], *, seed: int = 0) -> nn.Module:
    """A copy of the trained ``dense`` network converted by ``gate`` (a gate's own parameters seeded by ``seed``);
    the dense network is left as it is."""
    from gatesearch.policies import build_policy

    torch.manual_seed(seed)
    return build_policy(gate, **knobs).apply(copy.deepcopy(dense))


__all__ = ["NetworkSpec", "build_dense", "convert", "trained_dense"]
