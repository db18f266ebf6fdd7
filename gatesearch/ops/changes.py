"""Stream tensors and the positions their latest update changed.

A skip-conv's output z is updated in place once per frame (Skip-Convolutions,
Eq. 3), and only in the blocks it recomputes. Whatever reads z could then redo
only the positions that changed: a ReLU, a residual add or a max-pool rewrites
those positions of its own kept output, and a block-reference gate
(``BlockReference.gate``) does not even read blocks whose input halo did not
change. In a ResNet-18 at 224x224 these passes read whole tensors every frame
and cost a third of the gated frame once the convs skip most of their work.

A *stream tensor* is such an in-place-updated output. It carries
``(step, changed)``: how many updates it has had since it was made, and a bool
map (N, H, W) of the positions the latest one may have changed (None: any).
A consumer remembers the step it last saw; when the next one is exactly one
later it may trust the map, otherwise (it missed an update, or the map is
None) it redoes everything. Stream tensors are live: they change in place at
the next frame, so a consumer that keeps one across frames must copy it.
"""

from __future__ import annotations

import torch

from gatesearch.ops import _native

_ATTR = "_stream"


def mark(t: torch.Tensor, changed: torch.Tensor | None) -> torch.Tensor:
    """Record an update of t that changed the positions set in ``changed`` (None: any); t becomes a stream tensor."""
    info = getattr(t, _ATTR, None)
    setattr(t, _ATTR, (0 if info is None else info[0] + 1, changed))
    return t


def is_stream(t: torch.Tensor) -> bool:
    """Whether t (or the tensor it views) is a stream tensor, i.e. changes in place at the next frame."""
    return hasattr(t if t._base is None else t._base, _ATTR)


def step(t: torch.Tensor) -> int | None:
    """Updates t has had (None: not a stream tensor)."""
    info = getattr(t, _ATTR, None)
    return None if info is None else info[0]


def since(t: torch.Tensor, seen: int | None) -> torch.Tensor | None:
    """The map of positions of t that changed since the consumer saw update ``seen``, or None when it cannot
    tell (t is no stream tensor, the consumer missed an update, or the producer did not say)."""
    info = getattr(t, _ATTR, None)
    if info is None or seen is None or info[0] != seen + 1:
        return None
    return info[1]


def usable(*tensors: torch.Tensor) -> bool:
    """The changed-region kernels apply: C++ loaded, fp32 CPU channels_last stream tensors, no autograd."""
    return _native.usable(*tensors) and all(
        hasattr(t, _ATTR) and t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors
    )


def everywhere(t: torch.Tensor) -> torch.Tensor:
    """The map (N, H, W) with every position of t set: a full update."""
    return torch.ones(t.shape[0], *t.shape[2:], dtype=torch.bool)


def block_positions(mask: torch.Tensor, block: int, out_hw) -> torch.Tensor | None:
    """(N, Hb, Wb) block mask -> (N, Ho, Wo) map of the positions in active blocks (None without the C++ kernels)."""
    if not _native.available():
        return None
    return _native.ops().block_positions(mask, block, *out_hw)


def relu_(out: torch.Tensor, x: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """out <- relu(x) at the changed positions; returns the map of out's changes."""
    _native.ops().pointwise_changed_(out, x, None, changed, True)
    return changed


def add_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, changed_a: torch.Tensor,
         changed_b: torch.Tensor) -> torch.Tensor:
    """out <- a + b where either changed; returns the map of out's changes (the union)."""
    changed = changed_a | changed_b
    _native.ops().pointwise_changed_(out, a, b, changed, False)
    return changed


def max_pool_(out: torch.Tensor, x: torch.Tensor, changed: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """out <- max_pool2d(x) at the outputs whose window holds a changed input; returns the map of out's changes."""
    return _native.ops().max_pool_changed_(out, x, changed, list(kernel), list(stride), list(padding))
