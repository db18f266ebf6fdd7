"""Which gate can convert which backbone, found by trying it once.

Gate families need different structure: Skip-Conv gates per-frame ``Conv2d``
layers, D-STEP residual blocks, VA-RED² a clip or frame conv stack. Rather
than a table that drifts from the code, the space builds each searched
(backbone, gate) pair once at validation and applies the gate: the policy's
own refusal is the reason reported, before any trial starts.
"""

from __future__ import annotations

import functools
from typing import Any

from .params import Choice, Domain, Fixed, Range


def example(dom: Domain) -> Any:
    """One legal value of a domain (enough to build a policy for the check)."""
    if isinstance(dom, Fixed):
        return dom.value
    if isinstance(dom, Choice):
        return dom.values[0]
    assert isinstance(dom, Range)
    return int(dom.low) if dom.integer else dom.low


@functools.cache
def _incompatibility(backbone: str, gate: str, task: str, knobs: tuple) -> str | None:
    import torch

    from gatesearch.backbones import build
    from gatesearch.policies import build_policy

    try:
        with torch.random.fork_rng():
            build_policy(gate, **dict(knobs)).apply(build(backbone, task=task, num_classes=2))
    except ValueError as err:
        return str(err).splitlines()[0]
    return None


def incompatibility(backbone: str, gate: str, task: str, knobs: dict[str, Any]) -> str | None:
    """Why ``gate`` cannot convert ``backbone`` for ``task`` (None: it can)."""
    return _incompatibility(backbone, gate, task, tuple(sorted(knobs.items())))
