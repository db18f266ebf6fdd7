"""Finding 1: a gate that keeps everything computes the dense network.

Every gate family reduces to its dense network when its gate is open everywhere: Skip-Convolutions Eq. 2 with
g = 1 (z_t = z_{t-1} + w * r_t = w * x_t), D-STEP with every tile active and every channel computed, VA-RED² with
the full temporal and channel alternative. Here every registered backbone is converted by every gate that can
convert it, with the gate's ``keep_all()`` knobs and forced open, and streamed beside the same weights unconverted.
Batch-norm statistics are drawn at random so that folding BN into a gated conv is exercised too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .registry import Claim, Finding, register_finding

TOLERANCE = 1e-4  # max |gated − dense| / max(1, max |dense|), the bound


@dataclass(frozen=True, kw_only=True)
class Pair:
    backbone: str
    gate: str
    task: str
    diff: float  # relative_diff of the keep-all gated stream against the dense one


def _random_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial eval-mode BN statistics and affine parameters (fresh BNs are the identity)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            if m.affine:
                m.weight.data.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.data.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


def pairs(backbones: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(backbone, gate, task) for every registered backbone (or ``backbones``) and every gate that converts it; the
    clip task where the backbone has it, so that every stage runs (the heatmap head reads the stride-4 stage only)."""
    from gatesearch.backbones import BACKBONES
    from gatesearch.policies import POLICIES
    from gatesearch.spaces.compat import incompatibility

    out = []
    for backbone in backbones or BACKBONES:
        task = _task_of(backbone)
        out.extend((backbone, gate, task) for gate in POLICIES if gate != "dense"
                   and incompatibility(backbone, gate, task) is None)
    return out


def relative_diff(backbone: str, gate: str, task: str, clip: torch.Tensor, *, width: float, seed: int) -> float:
    """max |keep-all gated − dense| / max(1, max |dense|) of the streamed outputs; infinite when the gate converted
    nothing (equal outputs would then prove nothing)."""
    from gatesearch.backbones import build
    from gatesearch.policies import POLICIES, build_policy, force_open

    torch.manual_seed(seed)
    dense = _random_bn(build(backbone, task=task, num_classes=12, width=width), torch.Generator().manual_seed(seed))
    gated = force_open(build_policy(gate, **POLICIES.get(gate).keep_all()).apply(copy.deepcopy(dense))).eval()
    if not any(hasattr(m, "force_open") for m in gated.modules()):
        return float("inf")
    with torch.inference_mode():
        want = dense.stream(clip, reset_every=None)
        got = gated.stream(clip, reset_every=None)
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def _task_of(backbone: str) -> str:
    from gatesearch.backbones import BACKBONES

    tasks = BACKBONES.get(backbone)(width=0.25).tasks
    return "classification" if "classification" in tasks else tasks[0]


@register_finding("keep_all", number=1, title="A gate that keeps everything equals the dense network",
                  source="Skip-Conv Eq. 2, D-STEP Eq. 1, VA-RED² Eq. 3.1 with every unit computed")
def run(ctx) -> Finding:
    from gatesearch.data import SyntheticConfig, make_clip

    p = ctx.profile
    cfg = SyntheticConfig(height=p.equivalence_size, width=p.equivalence_size, frames=p.equivalence_frames,
                          seed=p.seed)
    clip = make_clip(cfg, 0, "test")["clip"][None]  # (1, T, 3, H, W)
    rows = []
    for backbone, gate, task in pairs(p.equivalence_backbones):
        diff = relative_diff(backbone, gate, task, clip, width=p.equivalence_width, seed=p.seed)
        rows.append(Pair(backbone=backbone, gate=gate, task=task, diff=diff))
        ctx.step(f"{backbone} · {gate}: {diff:.1e}")
    worst = max(rows, key=lambda r: r.diff)
    bad = [r for r in rows if not r.diff <= TOLERANCE]
    gates = sorted({r.gate for r in rows})
    claim = Claim(
        statement="keep-all gate = dense network, every gate × backbone",
        paper="exact (the gated formulations reduce to the dense conv)",
        ours=f"max rel. diff {worst.diff:.1e} ({worst.gate} on {worst.backbone}) over {len(rows)} pairs, "
             f"{len(bad)} above {TOLERANCE:g}",
        reproduced=not bad,
        rule=f"every pair within {TOLERANCE:g} of the dense output (relative to max(1, |dense|))",
    )
    table = ["| backbone | task | " + " | ".join(gates) + " |", "|---|---|" + "---:|" * len(gates)]
    for backbone in dict.fromkeys(r.backbone for r in rows):
        diffs = {r.gate: r.diff for r in rows if r.backbone == backbone}
        task = next(r.task for r in rows if r.backbone == backbone)
        table.append(f"| {backbone} | {task} | " + " | ".join(f"{diffs[g]:.1e}" if g in diffs else "–"
                                                              for g in gates) + " |")
    numbers = {"pairs": len(rows), "max_rel_diff": worst.diff, "pairs_above_tolerance": len(bad)}
    numbers.update({f"rel_diff.{r.backbone}.{r.gate}": r.diff for r in rows})
    which = ", ".join(p.equivalence_backbones) if p.equivalence_backbones else "every registered backbone"
    setup = (f"{which} at width {p.equivalence_width:g}, one synthetic clip of "
             f"{p.equivalence_frames} frames at {p.equivalence_size}×{p.equivalence_size} (seed {p.seed}), random "
             "BN statistics, streamed frame by frame; each gate with its keep_all() knobs, forced open")
    return Finding(claims=(claim,), numbers=numbers, setup=setup, details="\n".join(table))
