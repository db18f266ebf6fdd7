"""D-STEP: dynamic spatio-temporal pruning of residual blocks, trained to a FLOPs target.

D-STEP (Raviv, Dinai, Drozdov, Zehngut and Goldin), Section 3. Every residual
block gets a spatial tile policy and a skip / reuse / compute channel policy
between its first and second conv (``block.DStepBlock``, Eq. 1). The
network's FLOPs F are those of Eq. 2 (``flops``) summed over the gated blocks
(the policy networks' own cost included) and averaged over frames; F_S is the
same sum for the static network. Training minimises (Eq. 3)

    L = L_task + λ(e)·(F/F_S − D)² + γ·L_bound,   λ(e) = 0 for e < K, else α·exp(β·e),

so the target ratio D is the family's efficiency knob (``target_flops_ratio``).
L_bound (after Dynamic Dual Gating, the paper's [16]) holds each block's
spatial density within bounds that start tight around D and widen linearly
over training (``bound_start`` → ``bound_end``, short of [0, 1]), so no block's
mask collapses to all-0 or all-1 tiles.

Hitting D in a CPU trial of a few dozen steps (the paper trains 50 epochs)
needs three additions, each a ``DStepSettings`` field that can switch it off:
the spatial policy starts at the target rate (logit(D) bias; the paper notes
the spatial sparsity "has to be properly initialized"); the Gumbel noise fades
out and batch norm freezes on its running statistics late in training, so the
last steps see the decisions inference makes; and each block's logit offset
is nudged after every step by −gain·(F/F_S − D) of the batch (integral
control). Without them Eq. 3 alone lands within about ±0.1 of D in such
trials; with them, within ±0.05 (benchmarks/dstep_controllability.py).

The schedule needs the epoch: the trainer calls ``on_epoch(model, epoch,
epochs)`` at the start of every epoch. Without it, λ stays at its first
post-warm-up value, L_bound keeps its final bounds, the noise stays on and
batch norm never freezes.

The family's modules: ``nets`` (the policy networks and their samplers),
``tiles`` (the tile grid and its map onto each conv), ``flops`` (Eq. 2),
``block`` (the gated block, Eq. 1, and the conversion), ``settings``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from gatesearch.spaces.params import Param

from ..base import BLOCK_SIZE, Policy, register_policy
from ..structure import RESIDUAL_BLOCKS
from .block import DStepBlock, convert_blocks, dstep_blocks
from .flops import spent_flops, static_flops
from .settings import DStepSettings


class SparsityTerms(NamedTuple):
    ratio: torch.Tensor  # F/F_S, differentiable
    densities: list[torch.Tensor]  # per block: its mean spatial density


def sparsity_terms(model: nn.Module) -> SparsityTerms | None:
    """F/F_S over the frames streamed since the last call and the per-block spatial densities; drains records.

    None when no frame was streamed with autograd on. F and F_S are summed over
    the blocks and F averaged over frames and streams (Eq. 2).
    """
    spent, static, densities = [], 0.0, []
    for block in dstep_blocks(model):
        if not block.records:
            continue
        flops = torch.stack([r.flops for r in block.records])  # (frames, N)
        spent.append(flops.mean())
        densities.append(torch.stack([r.density for r in block.records]).mean())
        static += static_flops(block.convs())
        block.records = []
    if not spent:
        return None
    return SparsityTerms(torch.stack(spent).sum() / static, densities)


def flops_ratio(model: nn.Module) -> float:
    """Achieved F/F_S of the frames streamed since the last ``reset_stats``: the measured counterpart of D.

    Read from the gated convs' MacCounter statistics (density, gate_macs),
    so it is what ``MacCounter`` reports for the same layers.
    """
    convs = [conv for block in dstep_blocks(model) for conv in block.convs()]
    static = static_flops(convs)
    return spent_flops(convs) / static if static else 1.0


def decisions(model: nn.Module) -> dict[str, float]:
    """What the gates chose since the last ``reset_stats``, averaged over blocks (each weighted by its F_S):
    active-tile fraction and the fractions of skip / reuse / compute channels."""
    total, weight = {}, 0.0
    for block in dstep_blocks(model):
        w = static_flops(block.convs())
        for key, value in block.conv1.decisions.items():
            total[key] = total.get(key, 0.0) + w * value
        weight += w
    return {k: v / weight for k, v in total.items()} if weight else {}


def set_gating(model: nn.Module, on: bool) -> None:
    """Off: every block runs its original dense forward, also while streaming (the dense twin)."""
    for block in dstep_blocks(model):
        block.gating = on


@register_policy("dstep")
class DStep(Policy):
    """D-STEP (Eq. 1-3): p×p tiles and skip/reuse/compute channels per residual block, trained to a FLOPs ratio D."""

    params = (
        Param(name="target_flops_ratio", kind=float, low=0.0, low_open=True, high=1.0,
              default={"low": 0.3, "high": 0.9}, doc="D: the FLOPs ratio F/F_S training aims at (Eq. 3)"),
        BLOCK_SIZE,
    )
    requires = (RESIDUAL_BLOCKS,)
    trains_gates = True
    fine_tunes = True

    def __init__(self, *, settings: DStepSettings = DStepSettings(), **knobs) -> None:
        super().__init__(**knobs)
        self.target = self.knobs["target_flops_ratio"]
        self.settings = settings
        self.epoch: int | None = None  # set by on_epoch; None: no schedule
        self.epochs = 1

    def apply(self, model: nn.Module) -> nn.Module:
        if not convert_blocks(model, tile=int(self.knobs["block_size"]), settings=self.settings, target=self.target):
            raise ValueError("gate 'dstep' found no residual blocks to gate (it needs a ResNet-style backbone)")
        from ..frame_step import install

        install(model)  # streamed frames run natively: each block one plan step (dstep.plan)
        return model

    @classmethod
    def keep_all(cls) -> dict:
        """Any knobs: forced open, the gated stream computes the dense network (Eq. 1 with S = 1, T = compute)."""
        return cls.example_knobs()

    # -- schedule -------------------------------------------------------------------------------
    def on_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Trainer hook at the start of each epoch: λ(e), L_bound's bounds, the Gumbel noise and the batch-norm
        freeze follow it."""
        self.epoch, self.epochs = int(epoch), max(1, int(epochs))
        off = self.settings.noise_off
        noise = 1.0 if off is None else max(0.0, 1.0 - self.progress() / off)
        for block in dstep_blocks(model):
            block.noise = noise
        freeze = self.settings.freeze_bn
        if freeze is not None and self.progress() >= freeze and model.training:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def lam(self) -> float:
        """λ(e) of Eq. 3: 0 during the K warm-up epochs, then α·exp(β·e)."""
        s = self.settings
        e = s.warmup_epochs if self.epoch is None else self.epoch
        return 0.0 if e < s.warmup_epochs else s.lambda_alpha * math.exp(s.lambda_beta * e)

    def progress(self) -> float:
        """Fraction of training done at the start of this epoch, 0 … 1 (1 when no schedule is known)."""
        if self.epoch is None:
            return 1.0
        return min(1.0, self.epoch / max(1, self.epochs - 1))

    def bounds(self) -> tuple[float, float]:
        """L_bound's interval for each block's spatial density: [D·(1-r), D + (1-D)·r], r relaxing over training."""
        s = self.settings
        r = s.bound_start + (s.bound_end - s.bound_start) * self.progress()
        return self.target * (1.0 - r), self.target + (1.0 - self.target) * r

    # -- loss -----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, *, output: torch.Tensor | None = None,
             batch: dict | None = None) -> torch.Tensor | None:
        """λ(e)·(F/F_S − D)² + γ·L_bound over the frames just streamed (Eq. 3); drains the records and
        nudges every block's logit offset towards D (integral control, ``control_gain``)."""
        terms = sparsity_terms(model)
        if terms is None:
            return None
        ratio, densities = terms
        gain = self.settings.control_gain * (1.0 - 0.75 * self.progress())  # smaller steps as training settles
        if gain:
            with torch.no_grad():
                for block in dstep_blocks(model):
                    block.policy.offset -= gain * (ratio.detach().item() - self.target)
        total = ratio.new_zeros(())
        lam = self.lam()
        if lam > 0:
            total = total + lam * (ratio - self.target) ** 2
        low, high = self.bounds()
        if self.settings.gamma > 0 and (low > 0 or high < 1):
            rho = torch.stack(densities)
            bound = (torch.relu(rho - high) ** 2 + torch.relu(low - rho) ** 2).mean()
            total = total + self.settings.gamma * bound
        return total


__all__ = [
    "DStep", "DStepBlock", "DStepSettings", "SparsityTerms", "convert_blocks", "decisions", "dstep_blocks",
    "flops_ratio", "set_gating", "sparsity_terms",
]
