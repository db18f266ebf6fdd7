"""ReLU, max-pool and residual add of a block-reference stream, redone only where their inputs changed.

Between two skip-convs sit parameter-free layers that read their whole input
every frame, although a block-reference skip-conv changes its output only in
the blocks it recomputed (``ops.changes``). While streaming, these layers keep
their output (one per distinct input: a ResNet block calls its ReLU twice a
frame), rewrite only the changed positions, and pass on which those were, so
the next gate reads only the halos that could fire. Kept outputs are stream
tensors: live, as skip-conv states are.

``install(model)`` swaps the layers' classes in place (no parameters, same
state dict); outside a stream, or on inputs the kernels do not take, they are
the plain layers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gatesearch.backbones.base import Add
from gatesearch.ops import changes


class _Slot:
    """The kept output for one tuple of inputs, and the input updates it reflects."""

    __slots__ = ("inputs", "out", "seen")

    def __init__(self, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        self.inputs = [weakref.ref(t) for t in inputs]
        self.out = out
        self.seen: list[int | None] = [None] * len(inputs)

    def holds(self, inputs: Sequence[torch.Tensor], shape) -> bool:
        return tuple(self.out.shape) == tuple(shape) and all(ref() is t for ref, t in zip(self.inputs, inputs))


class StreamLayer:
    """Mixin: the streaming protocol (``gatesearch.stateful``) and the per-input kept outputs."""

    streaming = False

    def reset_state(self) -> None:
        self.__dict__["_slots"] = {}

    def _update(self, inputs: Sequence[torch.Tensor], shape, kernel: Callable) -> torch.Tensor:
        """The kept output for ``inputs`` brought up to date by ``kernel(out, maps) -> map of out's changes``:
        on the changed positions when every input says which they are, else everywhere."""
        slots = self.__dict__.setdefault("_slots", {})
        key = tuple(id(t) for t in inputs)
        slot = slots.get(key)
        if slot is None or not slot.holds(inputs, shape):
            if len(slots) >= 8:  # outputs of inputs gone since (an earlier clip) free their memory
                slots = {k: s for k, s in slots.items() if all(ref() is not None for ref in s.inputs)}
                self.__dict__["_slots"] = slots
            slot = slots[key] = _Slot(inputs, torch.empty(shape, memory_format=torch.channels_last))
        maps = [changes.since(t, seen) for t, seen in zip(inputs, slot.seen)]
        if any(m is None for m in maps):
            kernel(slot.out, [changes.everywhere(t) for t in inputs])
            changed = None
        else:
            changed = kernel(slot.out, maps)
        slot.seen = [changes.step(t) for t in inputs]
        return changes.mark(slot.out, changed)


class StreamReLU(StreamLayer, nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.streaming and changes.usable(x):
            return self._update((x,), x.shape, lambda out, maps: changes.relu_(out, x, maps[0]))
        return super().forward(x)


class StreamAdd(StreamLayer, Add):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.streaming and a.shape == b.shape and changes.usable(a, b):
            return self._update((a, b), a.shape, lambda out, maps: changes.add_(out, a, b, *maps))
        return super().forward(a, b)


class StreamMaxPool2d(StreamLayer, nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, p, d = (_pair(v)
                      for v in (self.kernel_size, self.stride or self.kernel_size, self.padding, self.dilation))
        if self.streaming and d == (1, 1) and not self.ceil_mode and not self.return_indices and changes.usable(x):
            out_hw = [(n + 2 * pi - ki) // si + 1 for n, pi, ki, si in zip(x.shape[2:], p, k, s)]
            return self._update((x,), (*x.shape[:2], *out_hw),
                                lambda out, maps: changes.max_pool_(out, x, maps[0], k, s, p))
        return super().forward(x)


_SWAPS = {nn.ReLU: StreamReLU, Add: StreamAdd, nn.MaxPool2d: StreamMaxPool2d}


def install(model: nn.Module) -> int:
    """Turn the model's plain ReLU, max-pool and residual-add layers into their stream versions; returns how many."""
    count = 0
    for m in model.modules():
        swap = _SWAPS.get(type(m))
        if swap is not None:
            m.__class__ = swap
            m.reset_state()
            count += 1
    return count


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
