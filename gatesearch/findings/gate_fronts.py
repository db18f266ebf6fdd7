"""Finding 2 (Skip-Convolutions Fig. 7): on the accuracy–MAC plane, Gumbel gates ≥ output-norm ≥ input-norm.

One shared trained network. The norm gates need no training: each sweeps ε over the span where its MACs move
(``measure.threshold_span`` on a few training clips), every point scored on the same held-out clips. Gumbel gates
are fine-tuned from the same network, one per β (Eq. 9). Gates are compared by their fronts: the mean, over the MAC
budgets every gate reaches, of the best quality within the budget (the area under the front, normalised).
"""

from __future__ import annotations

from .measure import Score, at_threshold, best_within, front_areas, log_grid, quality_name, score, threshold_span
from .plots import front_plot
from .registry import Claim, Finding, register_finding

NORM_GATES = ("input_norm", "output_norm")


def norm_sweep(ctx, gate: str, *, block_size: int, points: int) -> list[tuple[float, Score]]:
    """(ε, score) over the span where ``gate``'s MACs move, on the shared network; cached per gate and b."""
    spec = ctx.profile.frame_net

    def sweep() -> list[tuple[float, Score]]:
        calib = ctx.clips(spec, split="train", frames=spec.val_frames, count=ctx.profile.calibration_clips)
        model = ctx.gated(spec, gate, {"threshold": 1.0, "block_size": block_size})

        def fraction(eps: float) -> float:
            return score(at_threshold(model, eps), spec.task, calib, reset_every=spec.clip_length).fraction

        lo, hi = threshold_span(fraction)
        out = [(eps, score(at_threshold(model, eps), spec.task, ctx.held_out(spec), reset_every=spec.clip_length))
               for eps in log_grid(lo, hi, points)]
        ctx.step(f"{gate} b {block_size}: {points} thresholds over ε {lo:.3g}…{hi:.3g}")
        return out

    return ctx._once(("norm_sweep", gate, block_size, points), sweep)


def gumbel_sweep(ctx, *, block_size: int) -> list[tuple[float, Score]]:
    spec = ctx.profile.frame_net
    return [(beta, score(ctx.finetuned(spec, "gumbel", {"beta": beta, "block_size": block_size}), spec.task,
                         ctx.held_out(spec), reset_every=spec.clip_length))
            for beta in ctx.profile.betas]


@register_finding("gate_fronts", number=2, title="Gumbel ≥ output-norm ≥ input-norm on the accuracy–MAC plane",
                  source="Skip-Conv Fig. 7")
def run(ctx) -> Finding:
    from .runner import Candidate

    p, spec = ctx.profile, ctx.profile.frame_net
    block = 1  # Fig. 7 gates positions (structure is Table 3's question)
    dense = ctx.baseline(spec)
    sweeps = {gate: norm_sweep(ctx, gate, block_size=block, points=p.sweep_points) for gate in NORM_GATES}
    sweeps["gumbel"] = gumbel_sweep(ctx, block_size=block)
    fronts = front_areas(sweeps, dense)
    lo, area = fronts.low, fronts.area
    order = fronts.comparable and area["gumbel"] >= area["output_norm"] >= area["input_norm"]
    for gate, pts in sweeps.items():
        knob = "β" if gate == "gumbel" else "ε"
        value, s = best_within(pts, dense)
        ctx.candidates[gate] = Candidate(family=gate, label=f"{knob} {value:.3g}, b {block}", spec=spec,
                                         dense=ctx.dense(spec), gated=_model(ctx, gate, value, block), score=s,
                                         dense_score=dense)
    plot = front_plot(ctx.out / "gate_fronts.png", {g: [(s.macs, s.quality) for _, s in pts]
                                                    for g, pts in sweeps.items()},
                      dense=(dense.dense_macs, dense.quality), quality=quality_name(spec.task),
                      title="Skip-Conv gates on one trained network (Fig. 7)")
    ours = " ≥ ".join(f"{g} {100 * area[g]:.1f}" for g in sorted(area, key=area.get, reverse=True))
    claim = Claim(
        statement="Gumbel ≥ output-norm ≥ input-norm (area under the accuracy–MAC front)",
        paper="Gumbel above output-norm above input-norm at every cost (Fig. 7, EfficientDet D0–D3)",
        ours=f"{ours} (mean {quality_name(spec.task)} over MAC budgets {lo:.2f}–1.00 of dense)" if fronts.comparable
        else f"no MAC budget below dense that all three reach (the smallest MACs of one gate: ×{lo:.2f} of dense)",
        reproduced=order,
        rule="mean best quality over the MAC budgets (< dense) all three gates reach: Gumbel ≥ output-norm ≥ "
             "input-norm",
    )
    rows = ["| gate | knob | MACs / dense | " + quality_name(spec.task) + " |", "|---|---:|---:|---:|"]
    for gate, pts in sweeps.items():
        knob = "β" if gate == "gumbel" else "ε"
        rows += [f"| {gate} | {knob} {v:.3g} | {s.fraction:.3f} | {s.quality:.3f} |" for v, s in pts]
    rows.append(f"| dense | – | 1.000 | {dense.quality:.3f} |")
    numbers = {f"area.{g}": a for g, a in area.items()}
    numbers.update(budget_low=lo, dense_quality=dense.quality, dense_macs=dense.dense_macs)
    for gate, pts in sweeps.items():
        for i, (v, s) in enumerate(pts):
            numbers.update({f"{gate}.{i}.knob": v, f"{gate}.{i}.mac_fraction": s.fraction,
                            f"{gate}.{i}.quality": s.quality})
    setup = (f"{spec.describe()}; reference frame every {spec.clip_length} frames; block size {block}; "
             f"{p.sweep_points} thresholds per norm gate; Gumbel β ∈ {{{', '.join(f'{b:g}' for b in p.betas)}}}, "
             f"fine-tuned {p.finetune_epochs} epochs (lr {p.finetune_lr:g}) from the same network")
    return Finding(claims=(claim,), numbers=numbers, setup=setup, details="\n".join(rows), plots=(plot,))


def _model(ctx, gate: str, value: float, block: int):
    spec = ctx.profile.frame_net
    if gate == "gumbel":
        return ctx.finetuned(spec, gate, {"beta": value, "block_size": block})
    return ctx.gated(spec, gate, {"threshold": value, "block_size": block})
