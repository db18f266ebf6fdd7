"""VA-RED²: redundancy-adaptive video networks (Pan et al., ICLR 2021; thesis Chapter 3).

Every conv of the backbone becomes a ``DynamicConv`` (``layer``) with a
soft modulation gate that, per input, picks how much of the layer to compute:
a temporal stride × 2^j and a channel ratio (1/2)^i, j, i < S, the rest rebuilt
by cheap linear ops. (2+1)D / 3D backbones (``ClipModel``) get both
dimensions; per-frame 2D backbones get the channel dimension only, as the
thesis does for PSPNet (Section 4.3).

Training minimises L_a + λ_e·L_e (Section 3.4), with the efficiency loss

    L_e = (μ0 · Σ_l C(f_l)/Σ_k C(f_k) · r_l^s / R_l^s)²,  μ0 = 1 iff the clip is classified correctly  (Eq. 3.6)

averaged over the clips of a batch. λ_e is the joint space's ``lambda_e`` knob
(log scale) and S its ``search_space_size``.

How far a short fine-tuning gets (measured on the fidelity quick profile, finding 6: R(2+1)D-tiny at 48²,
192 clips, 24 steps an epoch, 4 epochs at lr 1e-3, L_e from epoch 2): no clip's head alternative closed, in any
layer at any step, so nothing is cut. L_e's gradient on a head's β_p is 3-10× the task's, so its sign holds and
Adam moves β_p at its fastest, about lr·``bias_gain`` a step: the 48 steps of the schedule's decaying half give
0.3-0.5 of travel, and a head needs β_p from β_0 = 0.5 (0.7-0.8 after the warm-up, where the task raises it)
to below 0. λ_e barely counts there: 0.1 → 1.0 moved the MACs from 1.024 to 1.020 of dense and top-1 from 0.600
to 0.383; without the warm-up the heads ended at β_p 0.08-0.29 (1.026 of dense); a 3× bias gain closed some
(−10.5 % MACs, top-1 0.383). At 64², 640 clips, 6 epochs (240 steps with L_e), S = 2 cut 23 %. A converted
network spends 1.0105 of dense (the gates' pooling and FCs), and cheap alternatives the task opens beside an
open head add their rebuilds (1.02-1.03 of dense after fine-tuning).

The family's modules: ``gate`` (the soft modulation gate, Eq. 3.4),
``rebuild`` (the cheap ops Φ^c, Φ^t), ``fused`` (rebuilds, V and the next BN
in one inference pass), ``cost`` (channel counts and accounting), ``layer``
(``DynamicConv``: the alternatives and the dense / sparse paths), ``settings``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from gatesearch.affine import next_batch_norms
from gatesearch.spaces.params import Param

from ..base import Policy, register_policy
from ..structure import BACKBONE_CONVS
from .cost import macs_per_output
from .fused import FUSED_BN
from .layer import DynamicConv
from .settings import GateSettings


def dynamic_layers(model: nn.Module) -> list[DynamicConv]:
    return [m for m in model.modules() if isinstance(m, DynamicConv)]


def convert(model: nn.Module, *, space_size: int, settings: GateSettings = GateSettings()) -> list[DynamicConv]:
    """Replace the convs of ``model.backbone`` by ``DynamicConv`` layers in place (heads stay dense).

    A ``ClipModel``'s ``Conv3d`` layers are gated in time and channels, a
    ``VideoModel``'s ``Conv2d`` layers in channels only; convs below
    ``settings.min_share`` of the conv MACs stay dense (in a network of many
    small convs, such as HRNet-w32, those below half the largest share).
    The BN that takes a gated conv's output is applied by that layer at
    inference, in the pass that writes its output.
    A model gated already, or anything else, is refused.
    """
    from gatesearch.backbones import ClipModel, VideoModel

    backbone = getattr(model, "backbone", None)
    name = type(backbone if backbone is not None else model).__name__
    if not isinstance(model, (ClipModel, VideoModel)):
        raise ValueError(f"gate 'vared2' does not support {name}: it gates the backbone of a VideoModel or ClipModel")
    kind = nn.Conv3d if isinstance(model, ClipModel) else nn.Conv2d
    if dynamic_layers(model):
        raise ValueError(f"gate 'vared2' does not support backbone {name} gated already: apply it to a plain model")
    shares, next_bn = conv_shares(model, kind)
    if not shares:
        raise ValueError(f"gate 'vared2' does not support backbone {name}: it has no plain {kind.__name__} to gate")
    floor = min(settings.min_share, max(shares.values()) / 2)
    layers = []
    for parent_name, parent in list(backbone.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = ".".join(p for p in ("backbone", parent_name, child_name) if p)
            if shares.get(full, 0.0) >= floor:
                layer = DynamicConv(child, space_size=space_size, settings=settings, name=full)
                setattr(parent, child_name, layer)
                layers.append(layer)
                if full in next_bn:  # applied by the layer at inference (``fused.fused_output``)
                    bn = next_bn[full]
                    bn.__class__ = FUSED_BN[type(bn)]
                    bn.__dict__["source"] = layer
                    layer.__dict__["bn"] = bn
    return layers


class ConvShares(NamedTuple):
    shares: dict[str, float]  # conv name -> its share of the model's conv MACs
    next_bn: dict[str, nn.Module]  # conv name -> the BN that takes its output


def conv_shares(model: nn.Module, kind: type[nn.Module]) -> ConvShares:
    """Share of the model's ``kind`` conv MACs each such conv of the backbone carries, and the BN that takes each
    conv's output, from one small probe pass.

    Only plain convs count (not those already inside a ``DynamicConv``). Shares
    of a fully convolutional network hardly depend on the input size, so a
    32×32 probe (8 frames for clip models) stands for any size. A conv the
    task never runs (the deep stages of a heatmap model) has share 0.
    """
    from gatesearch.backbones import ClipModel

    inner = {id(m.conv) for m in model.modules() if isinstance(m, DynamicConv)}
    convs = {n: m for n, m in model.named_modules() if n.startswith("backbone.") and id(m) not in inner
             and isinstance(m, (kind, DynamicConv))}  # gated ones count towards the total
    macs: dict[str, float] = {}

    def hook(name):
        def record(module, args, out):
            conv = module.conv if isinstance(module, DynamicConv) else module
            macs[name] = out[0].numel() * macs_per_output(conv)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in convs.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), next_batch_norms(model, convs, tuple(FUSED_BN)) as next_bn:
            if isinstance(model, ClipModel):
                model(torch.zeros(1, 8, 3, 32, 32))
            else:
                model.frame(torch.zeros(1, 3, 32, 32))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    total = sum(macs.values())
    shares = {n: v / total for n, v in macs.items() if not isinstance(convs[n], DynamicConv)} if total else {}
    return ConvShares(shares, next_bn)


def efficiency_loss(model: nn.Module, correct: torch.Tensor | None = None) -> torch.Tensor | None:
    """L_e of Eq. 3.6 over the forward passes since the last call; drains the layers' records.

    ``correct`` (B,) bool gives μ0 per clip (None: every clip counts). A layer
    that saw B·T samples (frames of a per-frame model) gives each clip the mean
    over its frames; one that saw several windows of a clip, their mean. None
    when nothing was recorded (no training forward with autograd on).
    """
    per_layer, weights = [], []
    clips = None if correct is None else correct.shape[0]
    for layer in dynamic_layers(model):
        if not layer.records:
            continue
        costs = [_per_clip(r.ratio, clips) for r in layer.records]  # each (B,) or (N,)
        per_layer.append(torch.stack(costs).mean(0))
        weights.append(sum(r.dense_macs for r in layer.records) / len(layer.records))
        layer.records = []
    if not per_layer:
        return None
    w = torch.tensor(weights, dtype=per_layer[0].dtype) / sum(weights)  # C(f_l) / Σ_k C(f_k)
    ratio = (w[:, None] * torch.stack(per_layer)).sum(0)  # (B,) MAC-weighted r^s/R^s
    if correct is not None:
        ratio = ratio * correct.to(ratio.dtype)  # μ0
    return (ratio**2).mean()


def _per_clip(cost: torch.Tensor, clips: int | None) -> torch.Tensor:
    """(N,) per-sample costs -> (B,) per clip; frames of a clip are consecutive (``VideoModel.forward``)."""
    if clips is None or cost.shape[0] == clips:
        return cost
    if cost.shape[0] % clips:
        raise ValueError(f"vared2: {cost.shape[0]} samples cannot be split into {clips} clips")
    return cost.view(clips, -1).mean(1)


def correct_clips(output: torch.Tensor | None, batch: dict | None) -> torch.Tensor | None:
    """μ0 of Eq. 3.6 for classification; None (every clip counts) when there is no label to compare."""
    if output is None or batch is None or "label" not in batch or output.dim() != 2:
        return None
    return output.detach().argmax(1) == batch["label"]


@register_policy("vared2")
class VaRed2(Policy):
    """VA-RED² (Eq. 3.1-3.6): per-conv soft gates choose temporal stride ×2^j and channel ratio 2^-i; the rest rebuilt cheaply."""  # noqa: E501 - `gatesearch list` shows this first line whole

    params = (
        Param(name="search_space_size", kind=int, choices=(2, 3, 4), default=[2, 3, 4],
              doc="S: alternatives per dimension, temporal stride ×2^j and channel ratio 2^-i, j, i < S (Eq. 3.5)"),
        Param(name="lambda_e", kind=float, low=0.0, default={"low": 0.01, "high": 10.0, "log": True},
              doc="λ_e: weight of the efficiency loss (Eq. 3.6)"),
    )
    requires = (BACKBONE_CONVS,)
    # the gates train in the ordinary batched forward: no frame-by-frame state to stream through
    trains_gates = False
    fine_tunes = True
    #: share of a trial's epochs trained without L_e: VA-RED² fine-tunes a trained dynamic model with the
    #: efficiency loss (Section 4.3: 40 of 160 epochs on Mini-Kinetics); a short trial splits its epochs
    warmup_fraction = 0.5

    def __init__(self, **knobs) -> None:
        super().__init__(**knobs)
        self.efficiency_on = True  # without epoch hooks (a bare training loop), L_e counts from the start

    def apply(self, model: nn.Module) -> nn.Module:
        convert(model, space_size=int(self.knobs["search_space_size"]))
        return model

    def on_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        self.efficiency_on = epoch >= int(self.warmup_fraction * epochs)

    def loss(self, model: nn.Module, *, output: torch.Tensor | None = None,
             batch: dict | None = None) -> torch.Tensor | None:
        """λ_e·L_e (Eq. 3.6); μ0 from ``output`` and ``batch["label"]`` when given.

        The layers' records are drained at every call, warm-up and λ_e = 0 included.
        """
        l_e = efficiency_loss(model, correct_clips(output, batch))
        lam = float(self.knobs["lambda_e"]) if self.efficiency_on else 0.0
        return None if l_e is None or lam == 0 else lam * l_e

    @classmethod
    def keep_all(cls) -> dict:
        """Any knobs: forced open, every layer computes everything (R = 1, r = 1), the dense network."""
        return cls.example_knobs()


__all__ = ["ConvShares", "DynamicConv", "GateSettings", "VaRed2", "conv_shares", "convert", "correct_clips",
           "dynamic_layers", "efficiency_loss"]
