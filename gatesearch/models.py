"""A trial's model: the backbone with its task's heads, converted by the trial's gate.

The one place a ``TrialConfig`` becomes a network, shared by training (``search``), loading an exported model
(``export``) and benchmarks; it sits below both so that neither imports the other.
"""

from __future__ import annotations

import torch

from gatesearch.spaces import TrialConfig


def build_model(cfg: TrialConfig, num_classes: int) -> torch.nn.Module:
    """The gated model of a trial, with fresh weights seeded by ``cfg.seed``."""
    from gatesearch.backbones import build
    from gatesearch.policies import build_policy

    torch.manual_seed(cfg.seed)
    model = build(cfg.backbone, task=cfg.task, num_classes=num_classes, width=cfg.width)
    return build_policy(cfg.gate, **cfg.knobs).apply(model)


__all__ = ["build_model"]
