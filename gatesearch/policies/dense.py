"""The dense baseline: no gate."""

from .base import Policy, register_policy


@register_policy("dense")
class Dense(Policy):
    """Dense baseline: every position of every frame is computed."""

    @classmethod
    def keep_all(cls) -> dict:
        return {}
