"""Gate families, one module each, registered by name in ``POLICIES``."""

from . import (  # noqa: F401  (registers their entries)
    dense,
    dstep,
    gumbel,
    norm_gates,
    vared2,
)
from .base import POLICIES, Policy, describe, register_policy


def build_policy(name: str, **knobs) -> Policy:
    """Instantiate the named policy with its joint-space knobs."""
    return POLICIES.get(name)(**knobs)


__all__ = ["POLICIES", "Policy", "build_policy", "describe", "register_policy"]
