"""The D-STEP policy networks of one block and their straight-through samplers (D-STEP, Section 3.1).

Between the first and second conv of a residual block, two small networks look
at the block input x_t:

* spatial policy: x_t average-pooled into tiles (one tile per p×p tile of the
  first conv's output), one 3×3 conv to a single map, binarised (Gumbel-sigmoid
  with straight-through gradients in training, rounding at inference): S_t;
* temporal channel policy: the S-masked x_t and x_{t-1}, global-average
  pooled, through a two-layer MLP, one of {skip, reuse, compute} per channel of
  the first conv's output (Gumbel-softmax, hard forward / relaxed backward): T_t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .settings import DStepSettings

SKIP, REUSE, COMPUTE = 0, 1, 2  # channel decisions (last axis of T)


class DStepPolicy(nn.Module):
    """Spatial 3×3 conv and temporal-channel MLP of one block (D-STEP, Section 3.1).

    Kept as bare parameters (no ``Conv2d`` / ``Linear`` children) so nothing
    mistakes them for backbone layers. Logit biases are stored divided by
    ``bias_gain`` (see ``DStepSettings``).
    """

    def __init__(self, c_in: int, channels: int, settings: DStepSettings = DStepSettings(), *,
                 target: float | None = None) -> None:
        super().__init__()
        self.gain = settings.bias_gain
        self.channels = channels
        hidden = max(settings.hidden_min, c_in // 2)
        self.spatial_weight = nn.Parameter(_uniform(1, c_in, 3, 3))
        init = settings.spatial_init
        if init is None:
            d = min(0.95, max(0.05, 1.0 if target is None else target))
            init = math.log(d / (1 - d))
        self.spatial_bias = nn.Parameter(torch.full((1,), init / self.gain))
        self.fc1_weight = nn.Parameter(_uniform(hidden, 2 * c_in))
        self.fc1_bias = nn.Parameter(_uniform(hidden, fan_in=2 * c_in))
        self.fc2_weight = nn.Parameter(_uniform(3 * channels, hidden))
        bias = torch.zeros(channels, 3)
        bias[:, COMPUTE] = settings.compute_init / self.gain
        self.fc2_bias = nn.Parameter(bias.flatten())
        self.register_buffer("offset", torch.zeros(1))  # added to the spatial and "compute" logits (control)

    def spatial_logits(self, tile_means: torch.Tensor) -> torch.Tensor:  # (N, Cin, Gh, Gw) -> (N, Gh, Gw)
        """The 3×3 conv to one map, as one GEMM over channels (N, 9, G) and a fold of the nine taps:
        a conv with a single output channel is a slow case for CPU conv kernels (3-10×)."""
        n, c, gh, gw = tile_means.shape
        taps = torch.matmul(self.spatial_weight.view(c, 9).t(), tile_means.reshape(n, c, gh * gw))  # (N, 9, G)
        out = F.fold(taps.flip(1), (gh, gw), 3, padding=1)  # (N, 1, Gh, Gw): Σ_k w_k · m[shifted by k]
        return out[:, 0] + (self.spatial_bias * self.gain + self.offset)

    def channel_logits(self, g: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:  # (N, Cin) ×2 -> (N, C, 3)
        hidden = F.relu(F.linear(torch.cat([g, g_prev], 1), self.fc1_weight, self.fc1_bias))  # (N, hidden)
        shift = self.offset * F.one_hot(torch.tensor(COMPUTE), 3).to(self.offset.dtype)  # (3,): compute only
        bias = (self.fc2_bias * self.gain).view(self.channels, 3) + shift
        return F.linear(hidden, self.fc2_weight, bias.flatten()).view(-1, self.channels, 3)

    def macs(self, c_in: int, in_hw: tuple[int, int], grid: tuple[int, int]) -> float:
        """Per frame: tile sums (one add per input value), the 3×3 conv and the masked GAP on the
        tile grid, and the MLP."""
        tiles = grid[0] * grid[1]
        hidden = self.fc1_weight.shape[0]
        return float(c_in * in_hw[0] * in_hw[1] + c_in * 9 * tiles + c_in * tiles
                     + 2 * c_in * hidden + hidden * 3 * self.channels)


def _uniform(*shape: int, fan_in: int | None = None) -> torch.Tensor:
    """PyTorch's default Conv2d / Linear initialisation: U(±1/sqrt(fan_in))."""
    fan_in = fan_in or math.prod(shape[1:])
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(*shape).uniform_(-bound, bound)


def binary_st(logits: torch.Tensor, *, noise: float, tau: float, sample: bool) -> torch.Tensor:
    """Gumbel-sigmoid: 0/1 values, the relaxation's gradient (straight-through). No sampling: round(σ)."""
    if sample and noise > 0:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logits = logits + noise * (torch.log(u) - torch.log1p(-u))  # logistic = difference of two Gumbels
    hard = (logits > 0).to(logits.dtype)
    if not torch.is_grad_enabled():
        return hard
    soft = torch.sigmoid(logits / tau)
    return hard + (soft - soft.detach())


def categorical_st(logits: torch.Tensor, *, noise: float, tau: float, sample: bool) -> torch.Tensor:
    """Gumbel-softmax over the last axis: one-hot forward, relaxed backward. No sampling: argmax."""
    if sample and noise > 0:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logits = logits - noise * torch.log(-torch.log(u))
    hard = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if not torch.is_grad_enabled():
        return hard
    soft = torch.softmax(logits / tau, -1)
    return hard + (soft - soft.detach())


__all__ = ["COMPUTE", "REUSE", "SKIP", "DStepPolicy", "binary_st", "categorical_st"]
