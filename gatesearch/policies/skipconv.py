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

import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    """Decides which output blocks of a skip-conv layer are recomputed."""

    def block_mask(self, r: torch.Tensor, layer: "SkipConv2d") -> torch.Tensor:
        """Residual (N, Ci, H, W) -> bool block mask (N, ceil(Ho/b), ceil(Wo/b))."""
        raise NotImplementedError

    def macs(self, layer: "SkipConv2d", in_hw: tuple[int, int], out_hw: tuple[int, int]) -> float:
        """Own cost of the gate per frame and stream, in multiply-accumulates."""
        return 0.0

    def train_mask(self, r: torch.Tensor, layer: "SkipConv2d", out_hw) -> torch.Tensor:
        """Residual -> float position mask (N, 1, Ho, Wo) used when training through the stream.

        Learned gates override this to let gradients reach their parameters
        (straight-through); fixed gates just upsample their block mask.
        """
        return upsample_blocks(self.block_mask(r, layer).to(r.dtype), layer.block_size, out_hw)


class SkipConv2d(nn.Module):
    """A ``Conv2d`` run on residuals with a gate (Skip-Convolutions, Eq. 3).

    While streaming, the returned tensor *is* the layer's state z_t and is
    updated in place at the next frame (a copy per layer would cost as much
    as the skipped work): consumers that keep it across frames must copy it.
    """

    def __init__(self, conv: nn.Conv2d, gate: Gate, *, block_size: int = 1, name: str = "") -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            conv = _explicit_padding(conv)
        self.conv = conv
        self.gate = gate
        self.block_size = block_size
        self.name = name
        self.streaming = False
        self.path = "auto"  # "auto" | "sparse" | "dense" (masked dense, the reference)
        self.reset_state()
        self.reset_stats()
        self._register_load_state_dict_pre_hook(_accept_dense_names)

    # -- state ------------------------------------------------------------
    def reset_state(self) -> None:
        self.x_prev: torch.Tensor | None = None
        self.z_prev: torch.Tensor | None = None

    def reset_stats(self) -> None:
        self.frames = 0  # frames seen while streaming (summed over streams)
        self.density_sum = 0.0  # sum over frames of the fraction of output positions computed
        self.gate_macs_sum = 0.0

    @property
    def density(self) -> float:
        return self.density_sum / self.frames if self.frames else 1.0

    @property
    def gate_macs(self) -> float:
        return self.gate_macs_sum / self.frames if self.frames else 0.0

    # -- forward ----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, Ci, H, W)
        if not self.streaming:
            return self.conv(x)
        if self.x_prev is None or self.x_prev.shape != x.shape:
            z = self.conv(x)  # reference frame: dense, bias included
            self._record(torch.ones(x.shape[0]), 0.0)
        else:
            z = self._residual_step(x)
        self.x_prev = x
        self.z_prev = z
        return z

    def _residual_step(self, x: torch.Tensor) -> torch.Tensor:
        from gatesearch import ops

        c = self.conv
        r = x - self.x_prev  # (N, Ci, H, W)
        z_prev = self.z_prev  # (N, Co, Ho, Wo)
        out_hw = z_prev.shape[-2:]
        gate_macs = self.gate.macs(self, x.shape[-2:], out_hw)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (r, c.weight, *self.gate.parameters())):
            # training through the stream: out of place so autograd sees every step
            mask = self.gate.train_mask(r, self, out_hw)  # (N, 1, Ho, Wo), 0/1 valued
            self._record(mask.detach().mean((1, 2, 3)), gate_macs)
            return z_prev + mask * F.conv2d(r, c.weight, None, c.stride, c.padding, c.dilation, c.groups)
        block_mask = self.gate.block_mask(r, self)  # (N, Hb, Wb)
        self._record(ops.block_density(block_mask, out_hw, self.block_size), gate_macs)
        geometry = dict(block_size=self.block_size, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
        if self.path == "dense":
            return ops.accumulate_masked_dense_(z_prev, r, c.weight, block_mask, **geometry)
        return ops.accumulate_block_sparse_(z_prev, r, c.weight, block_mask, path=self.path, **geometry)

    def _record(self, density: torch.Tensor, gate_macs: float) -> None:
        n = density.numel()
        self.frames += n
        self.density_sum += float(density.sum())
        self.gate_macs_sum += gate_macs * n


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


def convert_convs(model: nn.Module, make_gate, *, block_size: int) -> list[SkipConv2d]:
    """Replace every ``Conv2d`` of ``model`` by a ``SkipConv2d`` (in place).

    In-place activations are switched off: a skip-conv returns its own state
    tensor, which must not be changed by the layers after it.
    """
    layers = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Conv2d:
                layer = SkipConv2d(child, make_gate(child), block_size=block_size, name=full)
                setattr(parent, child_name, layer)
                layers.append(layer)
    if not layers:
        raise ValueError("Skip-Convolution gates found no Conv2d to gate (they need a per-frame 2D backbone)")
    for m in model.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    return layers


def skip_layers(model: nn.Module) -> list[SkipConv2d]:
    return [m for m in model.modules() if isinstance(m, SkipConv2d)]


def conv_out_hw(conv: nn.Conv2d, in_hw) -> tuple[int, int]:
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(in_hw, conv.padding, conv.dilation, conv.kernel_size, conv.stride)
    )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "Gate", "SkipConv2d", "convert_convs", "skip_layers", "upsample_blocks",
    "pool_blocks", "conv_out_hw", "ceil_div",
]
