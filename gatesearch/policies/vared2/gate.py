"""The VA-RED² soft modulation gate p_l (Eq. 3.4) and how its weights V read as decisions.

For each input the gate scores S alternatives per dimension, V ≥ 0:
the output is the V-weighted sum of the open alternatives (Eq. 3.5), and
what inference computes is the largest open alternative of each dimension
(``first_open``): every smaller one is a slice of it (Eq. A.2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gatesearch.affine import FoldCache, bn_affine, versions

from .settings import GateSettings


class Scores(NamedTuple):
    """V split by dimension: (N, S_t) and (N, S_c) tensors, or one sample's lists of floats."""

    temporal: torch.Tensor | list[float]  # V_t, by temporal stride ×2^j (a fixed 1 for a 2D layer)
    channel: torch.Tensor | list[float]  # V_c, by channel ratio (1/2)^i


class Head(NamedTuple):
    """The largest open alternative of each dimension: the one conv the sparse path runs (Eq. A.2)."""

    temporal: int  # j: index into the layer's strides (S_t when every V_t is 0)
    channel: int  # i: index into the layer's channel counts (S_c when every V_c is 0)


class FoldedLinear(NamedTuple):
    weight: torch.Tensor  # (in, out), transposed for addmm
    bias: torch.Tensor  # (out,)


class SoftModulationGate(nn.Module):
    """p_l of Eq. 3.4: V = max(tanh(FC2(tanh(BN(FC1(G(X))))) + β_p), 0) / tanh(β_0) ∈ [0, 1/tanh(β_0))^{S_t + S_c}.

    The division by the constant tanh(β_0) (β_0 = ``GateSettings.init_bias``) is ours: the full alternatives
    (``full``, one per dimension) start at β_p = β_0, the others at β_p = 0, and the last FC's weights at 0, so
    a freshly converted layer weighs its full alternative by exactly 1 and every other by 0 for every input,
    and computes the dense conv (VA-RED² fine-tunes a trained network; Eq. 3.4's [0, 1) range could only
    start it at a fraction of the dense output). The cut at 0 passes its gradient straight through
    (``_open``): a closed alternative still learns from the task loss whether opening it would help, so a
    cheaper one can open as the efficiency loss closes the full one (the thesis's φ, max(tanh, 0), has no
    gradient where it is 0 and would keep the cheap alternatives shut for good).
    """

    def __init__(self, cin: int, outputs: int, *, time_bins: int, settings: GateSettings = GateSettings(),
                 full: tuple[int, ...] = (0,)) -> None:
        super().__init__()
        self.time_bins = time_bins
        self.fc1 = nn.Linear(cin * time_bins, settings.hidden, bias=False)
        self.bn = nn.BatchNorm1d(settings.hidden)
        self.fc2 = nn.Linear(settings.hidden, outputs)  # its bias is stored as β_p / bias_gain
        self.bias_gain = settings.bias_gain
        self.unit = math.tanh(settings.init_bias)  # tanh(β_0): the score that reads as V = 1
        self._folds = FoldCache()
        with torch.no_grad():
            self.fc2.weight.mul_(settings.init_gain)
            self.fc2.bias.zero_()
            self.fc2.bias[list(full)] = settings.init_bias / settings.bias_gain

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """G: (N, Ci, T, H, W) -> (N, Ci·bins), or (N, Ci, H, W) -> (N, Ci)."""
        g = x.mean((-2, -1))  # (N, Ci, T) or (N, Ci); adaptive_avg_pool3d is ~10× slower on CPU
        if x.dim() == 5:
            n, c, t = g.shape
            bins = self.time_bins
            if t % bins == 0:
                g = g.view(n, c, bins, t // bins).mean(-1)
            else:  # one step repeats (as adaptive pooling does); other lengths overlap their bins
                g = g.expand(n, c, bins) if t == 1 else F.adaptive_avg_pool1d(g, bins)
            g = g.flatten(1)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # -> V (N, outputs)
        h = self.fc1(self.pool(x))
        bn = self.bn
        # BN needs two samples to take batch statistics; a lone clip in training uses the running ones
        train_stats = bn.training and h.shape[0] > 1
        h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, train_stats, bn.momentum, bn.eps)
        return _open(torch.tanh(F.linear(torch.tanh(h), self.fc2.weight, self.fc2.bias * self.bias_gain))) / self.unit

    def scores_eval(self, x: torch.Tensor) -> list[list[float]]:
        """Inference: tanh(FC2(tanh(BN∘FC1(G(X))))) / tanh(β_0) per sample as Python floats, BN folded into FC1.

        max(·, 0) is left to the caller, which reads the values anyway. Few
        dispatches: this runs once per layer and clip on the deployed path.
        """
        weight, bias = self._folded()
        h = torch.addmm(bias, self.pool(x), weight).tanh_()
        return torch.addmm(self.fc2.bias * self.bias_gain, h, self.fc2.weight.t()).tanh_().div_(self.unit).tolist()

    def _folded(self) -> FoldedLinear:
        """FC1 with the BN folded in, cached until a parameter or statistic changes."""
        bn = self.bn
        key = versions(self.fc1.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return self._folds.get("fc1", key, self._fold)

    def _fold(self) -> FoldedLinear:
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode
            scale, shift = bn_affine(self.bn)
            return FoldedLinear((self.fc1.weight * scale[:, None]).t().contiguous(), shift)

    def macs(self, in_shape: tuple[int, ...]) -> float:
        """Per sample: the pooling adds, then the two FCs."""
        return float(math.prod(in_shape) + self.fc1.in_features * self.fc1.out_features
                     + self.fc2.in_features * self.fc2.out_features)


def _open(score: torch.Tensor) -> torch.Tensor:
    """max(score, 0) with the gradient of the identity: exact zeros forward, and a closed alternative's score
    still moves by what opening it would do to the loss (its features are computed in training anyway)."""
    return score + (torch.relu(score) - score).detach()


def first_open(weights: list[float]) -> int:
    """Index of the first non-zero weight (the largest alternative the gate keeps), or S when none."""
    return next((i for i, w in enumerate(weights) if w > 0), len(weights))


__all__ = ["FoldedLinear", "Head", "Scores", "SoftModulationGate", "first_open"]
