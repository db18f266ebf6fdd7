"""Which gate can convert which backbone, from the structure the gate declares it needs.

Gate families need different structure (``policies.structure``): Skip-Conv gates per-frame ``Conv2d`` layers,
D-STEP residual blocks, VA-RED² the convolutions of a backbone. Each gate says which in ``Policy.requires``; the
space builds each searched backbone and looks for that structure, so an impossible pair is a one-line error
before any trial starts. (The contract tests check that ``apply`` refuses exactly those pairs.)
"""

from __future__ import annotations

import functools


def _build(backbone: str, task: str):
    import torch

    from gatesearch.backbones import build

    with torch.random.fork_rng():
        return build(backbone, task=task, num_classes=2)


@functools.cache
def _build_error(backbone: str, task: str) -> str | None:
    try:
        _build(backbone, task)
    except ValueError as err:
        return str(err).splitlines()[0]
    return None


@functools.cache
def _lacking(backbone: str, task: str, requires: tuple):
    """The first of ``requires`` (Structures) that the dense model of ``backbone`` lacks; None: it has them all."""
    if not requires:
        return None
    model = _build(backbone, task)
    return next((s for s in requires if not s.found(model)), None)


def incompatibility(backbone: str, gate: str, task: str) -> str | None:
    """Why ``gate`` cannot convert ``backbone`` for ``task`` (None: it can)."""
    from gatesearch.policies import POLICIES

    if why := _build_error(backbone, task):
        return why
    lacking = _lacking(backbone, task, tuple(POLICIES.get(gate).requires))
    return None if lacking is None else f"gate {gate!r} needs {lacking.name}"
