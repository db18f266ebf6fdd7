"""The streaming protocol shared by every gated layer.

A stateful layer has a boolean ``streaming`` attribute and a ``reset_state()``
method. While streaming, one call is one frame and the layer may reuse what it
kept from the previous frame; outside, it behaves as a plain layer over a batch
of independent frames. Resetting makes the next frame a dense reference frame.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def stateful_layers(model: nn.Module) -> list[nn.Module]:
    # the method is looked up on the class first: ``hasattr`` on a module that lacks the name goes through
    # nn.Module.__getattr__ and an exception, which for every module of a network costs ~0.2 ms per clip
    return [m for m in model.modules() if callable(getattr(type(m), "reset_state", None)) and hasattr(m, "streaming")]


def _set_streaming(m: nn.Module, on: bool) -> None:
    object.__setattr__(m, "streaming", on)  # a plain flag: skips nn.Module.__setattr__'s registry checks


def reset_state(model: nn.Module) -> None:
    for m in stateful_layers(model):
        m.reset_state()


@contextlib.contextmanager
def streaming(model: nn.Module) -> Iterator[None]:
    """Within this block, stateful layers keep state between calls (one call = one frame)."""
    layers = stateful_layers(model)
    for m in layers:
        _set_streaming(m, True)
        m.reset_state()
    try:
        yield
    finally:
        for m in layers:
            _set_streaming(m, False)
            m.reset_state()
