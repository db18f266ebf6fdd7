"""A trial's model: the backbone with its task's heads, converted by the trial's gate.

The one place a ``TrialConfig`` becomes a network, shared by training (``search``), loading an exported model
(``export``) and benchmarks; it sits below both so that neither imports the other.
"""

from __future__ import annotations

import torch

from gatesearch.spaces import TrialConfig


def build_model(cfg: TrialConfig, num_classes: int, *, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The gated model of a trial: fresh weights seeded by ``cfg.seed``, or the dense network's trained ``state``
    (loaded before the gate converts the model, so every gate starts from the same dense weights; a gate's own
    parameters are initialised from the seed)."""
    from gatesearch.backbones import build
    from gatesearch.policies import build_policy

    torch.manual_seed(cfg.seed)
    model = build(cfg.backbone, task=cfg.task, num_classes=num_classes, width=cfg.width)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return build_policy(cfg.gate, **cfg.knobs).apply(model)


__all__ = ["build_model"]
