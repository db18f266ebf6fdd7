"""Skip-Convolutions: a conv computed on frame residuals, gated per position.

Skip-Convolutions (Habibian et al., CVPR 2021), Eq. 2-3: a conv keeps its
previous input x_{t-1} and output z_{t-1}; for frame t it forms the residual
r_t = x_t - x_{t-1} and updates z_t = z_{t-1} + g(r_t) ⊙ (w * r_t). The first
frame (and every reference reset) is computed densely. Masks are structured in
b×b blocks (Section 3.2.2, "Structured Sparsity": max-pool b, nearest upsample b).

Layers hold state only while streaming (``streaming(model)``); a batched
forward over many frames is the plain dense conv, which is what norm gates
train with. The streaming protocol is in ``gatesearch.stateful``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.affine import next_batch_norms

from .base import FrameAverages

REFERENCES = ("frame", "block")


class Gate(nn.Module):
    """Decides which output blocks of a skip-conv layer are recomputed."""

    def block_mask(self, r: torch.Tensor, layer: SkipConv2d) -> torch.Tensor:
        """Residual (N, Ci, H, W) -> bool block mask (N, ceil(Ho/b), ceil(Wo/b))."""
        raise NotImplementedError

    def plan(self, layer: SkipConv2d, x: torch.Tensor, out_hw, reference=None) -> Callable:
        """Inference, once per clip: ``(x, x_prev) -> (block mask of r = x - x_prev, r or None)``. A gate
        that reads the pair itself returns None for r, and the kernels subtract only where a block is active.
        With an ``ops.BlockReference`` (reference mode "block") the residual is x minus each block's reference."""
        if reference is not None:
            raise ValueError(f"{type(self).__name__} cannot gate against block references; "
                             "reference='block' needs a norm gate")

        def frame_mask(x_, x_prev):
            r = x_ - x_prev
            return self.block_mask(r, layer), r

        return frame_mask

    def macs(self, layer: SkipConv2d, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> float:
        """Own cost of the gate per frame and stream, in multiply-accumulates."""
        return 0.0

    def train_mask(self, r: torch.Tensor, layer: SkipConv2d, out_hw) -> torch.Tensor:
        """Residual -> float position mask (N, 1, Ho, Wo) used when training through the stream.

        Learned gates override this to let gradients reach their parameters
        (straight-through); fixed gates just upsample their block mask.
        """
        return upsample_blocks(self.block_mask(r, layer).to(r.dtype), layer.block_size, out_hw)


class SkipConv2d(FrameAverages, nn.Module):
    """A ``Conv2d`` run on residuals with a gate (Skip-Convolutions, Eq. 3).

    While streaming, the returned tensor *is* the layer's state z_t and is
    updated in place at the next frame (a copy per layer would cost as much
    as the skipped work): consumers that keep it across frames must copy it.
    """

    def __init__(self, conv: nn.Conv2d, gate: Gate, *, block_size: int = 1, name: str = "",
                 reference: str = "frame") -> None:
        super().__init__()
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            conv = _explicit_padding(conv)
        self.conv = conv
        self.gate = gate
        self.block_size = block_size
        self.reference = reference  # "frame": r_t = x_t - x_{t-1} (Eq. 3); "block": see ops.block_ref
        self.name = name
        self.streaming = False
        self.path = "auto"  # "auto" | "sparse" | "dense" (masked dense, the reference)
        self.__dict__["bn"] = None  # a FoldedBatchNorm2d fed by this conv (not a submodule: the parent owns it)
        self.folded = False  # this clip's state holds BN(z): the BN's affine map rides in the weights
        self._fold_cache: tuple | None = None
        self.reset_state()
        self.reset_stats()
        self._register_load_state_dict_pre_hook(_accept_dense_names)

    # -- state ------------------------------------------------------------
    def reset_state(self) -> None:
        # plain attributes written straight into __dict__: nn.Module.__setattr__ costs µs each, every layer, every clip
        self.__dict__.update(
            resets=self.__dict__.get("resets", 0) + 1,  # a frame runner (policies.frame_step) starts a clip anew
            x_prev=None, z_prev=None,
            _plan=None,  # (gate, step, gate MACs): resolved at a clip's first residual frame
            _x_step=None,  # the update of a stream-tensor input seen at the reference frame
            # the last inference frame's block mask (None: every position computed) and output shape (N, Ho, Wo)
            _computed=None,
        )

    # -- forward ----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, Ci, H, W)
        if not self.streaming:
            return self.conv(x)
        from gatesearch.ops import changes

        state = self.__dict__  # per-frame attributes bypass nn.Module.__setattr__ (a few µs each, every layer)
        reference_frame = self.x_prev is None or self.x_prev.shape != x.shape
        if changes.is_stream(x) and (reference_frame or self.reference == "frame"):
            # another layer's live output, changed in place next frame: a frame residual needs this frame's values
            # then (block references copy what they need, but are filled from the reference frame's x at the next)
            state["_x_step"] = changes.step(x)
            x = x.clone()
        elif reference_frame:
            state["_x_step"] = None
        if not x.is_contiguous(memory_format=torch.channels_last):
            # streams run channels_last: the gates and gathers read whole channel vectors, and the state (and
            # so every layer after) keeps that layout; only the first layer converts, its 3-channel frame
            x = x.contiguous(memory_format=torch.channels_last)
        if reference_frame:
            bn = self.bn
            state["folded"] = bn is not None and not bn.training and not torch.is_grad_enabled()
            # reference frame: dense, bias (and a folded BN) included
            z = self.conv._conv_forward(x, *self.folded_params()) if self.folded else self.conv(x)
            changes.mark(z, None)
            state["_plan"] = None  # shapes, weights or path may have changed since the last clip
            state["_computed"] = (None, (z.shape[0], *z.shape[-2:]))  # every position computed
            self._record(float(x.shape[0]), x.shape[0], 0.0)
        else:
            z = self._residual_step(x)
        state["x_prev"], state["z_prev"] = x, z
        return z

    def _residual_step(self, x: torch.Tensor) -> torch.Tensor:
        from gatesearch import ops

        c = self.conv
        weight = self._fold_cache[1] if self.folded else c.weight  # checked at this clip's reference frame
        x_prev, z_prev = self.x_prev, self.z_prev  # (N, Ci, H, W), (N, Co, Ho, Wo)
        out_hw = z_prev.shape[-2:]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, x_prev, c.weight, *self.gate.parameters())):
            # training through the stream: out of place so autograd sees every step
            r = x - x_prev
            mask = self.gate.train_mask(r, self, out_hw)  # (N, 1, Ho, Wo), 0/1 valued
            self._record(float(mask.detach().mean((1, 2, 3)).sum()), mask.shape[0],
                         self.gate.macs(self, x.shape[-2:], out_hw))
            return z_prev + mask * F.conv2d(r, weight, None, c.stride, c.padding, c.dilation, c.groups)
        gate, step, gate_macs = self._plan or self._make_plan(x, z_prev, weight)
        block_mask, r = gate(x, x_prev)  # (N, Hb, Wb); r None: the kernels subtract x - x_prev themselves
        self.__dict__["_computed"] = (block_mask, (z_prev.shape[0], *out_hw))  # a reference, no copy
        rows = step(z_prev, x, block_mask, x_prev) if r is None else step(z_prev, r, block_mask)
        if rows < 0:
            rows = ops.active_positions(block_mask, out_hw, self.block_size)
        self._record(rows / (out_hw[0] * out_hw[1]), block_mask.shape[0], gate_macs)
        # z changed in the active blocks only; layers after a block-reference skip-conv redo just those
        changed = (ops.changes.block_positions(block_mask, self.block_size, out_hw) if self.reference == "block"
                   else None)
        return ops.changes.mark(z_prev, changed)

    def computed_positions(self) -> torch.Tensor | None:
        """Where the last streamed frame was computed, bool (N, Ho, Wo): every position on a reference frame, the
        gate's blocks after it (the masks Skip-Convolutions, Fig. 2-3, draw over the frames); None before any
        inference frame. Its mean is the density this frame added to the layer's statistics."""
        computed = self.__dict__["_computed"]
        if computed is None:
            return None
        mask, (n, *out_hw) = computed
        if mask is None:
            return torch.ones(n, *out_hw, dtype=torch.bool, device=self.conv.weight.device)
        return upsample_blocks(mask, self.block_size, out_hw)[:, 0].bool()

    def _make_plan(self, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> tuple:
        """What stays fixed over a clip, resolved at its first residual frame: the gate, the conv step
        (``ops.sparse_step``: geometry, packed weight, crossover) and the gate's MACs."""
        from gatesearch import ops

        c, out_hw = self.conv, z.shape[-2:]
        geometry = dict(block_size=self.block_size, stride=c.stride, padding=c.padding, dilation=c.dilation,
                        groups=c.groups)
        if self.reference == "block":
            return self._make_block_plan(x, z, weight, geometry)
        if self.path == "dense":  # the reference formulation, as research code runs it
            def step(z_, r, mask, r_prev=None):
                ops.accumulate_masked_dense_(z_, r if r_prev is None else r - r_prev, weight, mask, **geometry)
                return -1
        else:
            step = ops.sparse_step(z, x, weight, path=self.path, **geometry)
        plan = (self.gate.plan(self, x, out_hw), step, self.gate.macs(self, x.shape[-2:], out_hw))
        self.__dict__["_plan"] = plan
        return plan

    def _make_block_plan(self, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, geometry: dict) -> tuple:
        """Reference mode "block": references filled from the clip's reference frame (x_prev here)."""
        from gatesearch import ops

        geom = ops.resolve_geometry(x.shape, weight.shape, **geometry)
        reference = ops.BlockReference(self.x_prev, geom, seen=self._x_step)
        bias = self._fold_cache[2] if self.folded else self.conv.bias
        max_rows = ops.sparse_rows_limit(geom, x, self.path)  # "dense": the masked dense formulation every frame

        def step(z_, x_, mask, x_prev=None):
            return reference.step(z_, x_, weight, bias, mask, max_rows=max_rows)

        gate = self.gate.plan(self, x, geom.out_hw, reference=reference)
        plan = (gate, step, self.gate.macs(self, x.shape[-2:], geom.out_hw))
        self.__dict__["_plan"] = plan
        return plan

    def folded_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias with the eval-mode BN after this conv folded in (``ops.channel_gather.FoldedConv``):
        BN is a per-channel affine map, so residual updates carry it too. Cached until a parameter changes; the
        weight channels_last, as the reference frame's dense conv wants it for channels_last streams (else oneDNN
        re-lays it out at every clip: 9.4 MB for one layer4 conv of ResNet-18)."""
        from gatesearch.ops.channel_gather import FoldedConv

        key = FoldedConv.version_key(self.conv, self.bn)
        if self._fold_cache is None or self._fold_cache[0] != key:
            folded = FoldedConv.fold(self.conv, self.bn)
            self._fold_cache = (key, folded.weight.contiguous(memory_format=torch.channels_last), folded.bias)
        return self._fold_cache[1], self._fold_cache[2]

    def _record(self, density_sum: float, n: int, gate_macs: float) -> None:
        """Add n stream-frames whose recomputed fractions sum to density_sum."""
        stats = self.__dict__
        stats["frames"] += n
        stats["density_sum"] += density_sum
        stats["gate_macs_sum"] += gate_macs * n


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` right after a skip-conv. BN is affine per channel at inference, so while that conv streams
    in eval mode it carries the BN in its weights and state (Skip-Convolutions, Section 3) and this layer passes its
    input through: no full-frame BN pass per frame. Training and batched passes are plain BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.__dict__.get("source")
        if source is not None and source.streaming and source.folded:
            return x
        return super().forward(x)


def fold_batch_norms(model: nn.Module) -> int:
    """Pair every skip-conv with the BatchNorm2d that consumes its output, found by a probe frame through
    ``model.frame`` and the backbone's deep stages; returns the number of pairs. Models without ``frame`` keep
    their BNs as they are."""
    if not hasattr(model, "frame"):
        return 0
    layers = {layer: layer for layer in skip_layers(model)}
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), next_batch_norms(model, layers, (nn.BatchNorm2d,)) as found:
            x = torch.zeros(1, 3, 64, 64)
            model.frame(x)  # the task's path, heads included
            backbone = getattr(model, "backbone", None)
            if hasattr(backbone, "deep"):
                backbone.deep(backbone.fine(x))  # and the deep stages a heatmap task skips
    finally:
        model.train(was_training)
    pairs = {layer: bn for layer, bn in found.items()
             if layer.bn is None and layer.conv.out_channels == bn.num_features}
    for layer, bn in pairs.items():
        bn.__class__ = FoldedBatchNorm2d
        bn.__dict__["source"] = layer
        layer.__dict__["bn"] = bn
    return len(pairs)


def _accept_dense_names(state_dict, prefix, *args) -> None:
    """Let a dense network's weights load into the gated one: ``<conv>.weight`` -> ``<conv>.conv.weight``."""
    for key in ("weight", "bias"):
        if prefix + key in state_dict and prefix + "conv." + key not in state_dict:
            state_dict[prefix + "conv." + key] = state_dict.pop(prefix + key)


def upsample_blocks(mask: torch.Tensor, b: int, out_hw) -> torch.Tensor:
    """(N, Hb, Wb) block mask -> (N, 1, Ho, Wo) position mask (nearest upsample by b, cropped)."""
    m = mask.unsqueeze(1)
    if b > 1:
        m = m.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)
    return m[..., : out_hw[0], : out_hw[1]]


def pool_blocks(mask: torch.Tensor, b: int) -> torch.Tensor:
    """(N, 1, Ho, Wo) position mask -> (N, ceil(Ho/b), ceil(Wo/b)) block mask (max-pool b)."""
    if b > 1:
        mask = F.max_pool2d(mask, b, b, ceil_mode=True)
    return mask.squeeze(1)


def _explicit_padding(conv: nn.Conv2d) -> nn.Conv2d:
    """Skip-convs need zero padding given as numbers (a residual of padding is zero)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"skip-conv needs zero padding, got padding_mode={conv.padding_mode!r}")
    k, d = conv.kernel_size, conv.dilation
    if conv.padding == "valid":
        conv.padding = (0, 0)
    elif conv.padding == "same":
        if any(s != 1 for s in conv.stride) or any((di * (ki - 1)) % 2 for ki, di in zip(k, d)):
            raise ValueError("skip-conv supports padding='same' only with stride 1 and symmetric padding")
        conv.padding = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    return conv


def convert_convs(model: nn.Module, make_gate, *, block_size: int, reference: str = "frame") -> list[SkipConv2d]:
    """Replace every ``Conv2d`` of ``model`` by a ``SkipConv2d`` (in place).

    In-place activations are switched off: a skip-conv returns its own state
    tensor, which must not be changed by the layers after it. With block
    references, ReLU, max-pool and residual adds become their stream versions
    (``stream_ops``).
    """
    layers = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Conv2d:
                layer = SkipConv2d(child, make_gate(child), block_size=block_size, name=full, reference=reference)
                setattr(parent, child_name, layer)
                layers.append(layer)
    if not layers:
        raise ValueError("Skip-Convolution gates found no Conv2d to gate (they need a per-frame 2D backbone)")
    for m in model.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    fold_batch_norms(model)
    if reference == "block":  # their convs change only recomputed blocks: ReLU, add, max-pool follow suit
        from .stream_ops import install

        install(model)
    from .frame_step import install as install_frame_step

    install_frame_step(model)  # streamed frames run natively, without Python between layers
    return layers


def skip_layers(model: nn.Module) -> list[SkipConv2d]:
    return [m for m in model.modules() if isinstance(m, SkipConv2d)]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "FoldedBatchNorm2d", "Gate", "SkipConv2d", "convert_convs", "fold_batch_norms", "skip_layers", "upsample_blocks",
    "pool_blocks", "ceil_div",
]
