"""Eval-mode batch norm as a per-channel affine map, and cache keys for what gated layers fold from parameters.

Several gated layers fold a BN into what they compute at inference (Skip-Conv
and D-STEP into conv weights, VA-RED² into its rebuild pass and its gate's
first FC). They share the map and the rule that says when a cached fold is
stale.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (C,): BN(x) = scale·x + shift per channel, from the running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def versions(*tensors: torch.Tensor | None) -> tuple:
    """Changes whenever one of ``tensors`` is updated in place (an optimizer step, ``load_state_dict``) or has its
    storage swapped: the key under which a fold of them is cached. Inference tensors keep no version counter."""
    return tuple((-1, -1) if t is None else (t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)


class _Fold(NamedTuple):
    key: tuple  # ``versions`` of what it was folded from
    value: Any


class FoldCache:
    """Folds cached by name, each recomputed when the ``versions`` key of what it was folded from changes."""

    def __init__(self) -> None:
        self._folds: dict[Hashable, _Fold] = {}

    def get(self, name: Hashable, key: tuple, fold: Callable[[], Any]) -> Any:
        hit = self._folds.get(name)
        if hit is None or hit.key != key:
            hit = self._folds[name] = _Fold(key, fold())
        return hit.value


@contextmanager
def next_batch_norms(model: nn.Module, producers: dict, bn_types: tuple[type, ...]) -> Iterator[dict]:
    """While open, finds for each module of ``producers`` (key -> module) the BN of one of ``bn_types`` whose input
    is exactly that module's output (affine, with running statistics): what a probe pass run inside reveals.
    Yields {key: bn}, filled as the probe runs."""
    outputs: dict[int, tuple] = {}  # id(output) -> (key, output); the tensor is kept so that its id stays unique
    found: dict = {}

    def record(key):
        def hook(module, args, out):
            outputs[id(out)] = (key, out)
        return hook

    def consume(bn, args):
        key, out = outputs.pop(id(args[0]), (None, None))
        if out is args[0] and bn.affine and bn.track_running_stats:
            found[key] = bn

    handles = [m.register_forward_hook(record(k)) for k, m in producers.items()]
    handles += [m.register_forward_pre_hook(consume) for m in model.modules() if type(m) in bn_types]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


__all__ = ["FoldCache", "bn_affine", "next_batch_norms", "versions"]
