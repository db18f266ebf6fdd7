"""Gate families, one module each, registered by name in ``POLICIES``.

Every module of this package is imported when the package is (``registry.import_submodules``), so a new gate
is one new file with a ``@register_policy`` class; ``base`` states what that class declares.
"""

from gatesearch.registry import import_submodules

from .base import POLICIES, Policy, adopt, force_open, register_policy
from .structure import Structure

import_submodules(__name__, __path__)


def build_policy(name: str, **knobs) -> Policy:
    """Instantiate the named policy with its knobs (checked against its declarations)."""
    return POLICIES.get(name)(**knobs)


__all__ = ["POLICIES", "Policy", "Structure", "adopt", "build_policy", "force_open", "register_policy"]
