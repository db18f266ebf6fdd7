"""Finding 7: for each gate family, the measured wall-clock speedup against the MAC reduction.

Papers report MACs; what a user gets is time. Each family's operating point comes from the runs of findings 2, 5
and 6 (the fewest MACs within one point of dense quality, on the held-out clips), and is timed against its dense
network side by side on one clip (the ``--video`` clip when given): streams interleaved, median of per-round
ratios, the device lock held. Efficiency = speedup / MAC reduction. The papers' own figures: Skip-Conv Table 2
(HRNet-w32 on a Xeon CPU, conv layers only) 1.48× at 2.51×, 1.91× at 4.33×, 4.09× at 7.92× fewer MACs
(efficiency 0.44–0.59); VA-RED² Table 4.1 205.5 against 192.1 clips/s at −28 % GFLOPs (1.07× at 1.39×,
efficiency 0.77); D-STEP reports FLOPs only.
"""

from __future__ import annotations

from .plots import line_plot
from .registry import Claim, Finding, register_finding

SKIPCONV_TABLE2 = ((2.51, 1.48), (4.33, 1.91), (7.92, 4.09))  # (MAC reduction, time reduction)
PAPER = {
    "input_norm": ("Skip-Conv", min(t / m for m, t in SKIPCONV_TABLE2)),
    "output_norm": ("Skip-Conv", min(t / m for m, t in SKIPCONV_TABLE2)),
    "gumbel": ("Skip-Conv", min(t / m for m, t in SKIPCONV_TABLE2)),
    "dstep": ("D-STEP", None),
    "vared2": ("VA-RED²", (205.5 / 192.1) / (27.7 / 20.0)),
}
PAPER_TEXT = {
    "Skip-Conv": "1.48–4.09× at 2.51–7.92× fewer MACs, efficiency 0.44–0.59 (Table 2, CPU)",
    "D-STEP": "not reported (FLOPs only)",
    "VA-RED²": "1.07× at 1.39× fewer GFLOPs, efficiency 0.77 (Table 4.1, 8 frames)",
}


@register_finding("wallclock", number=7, title="Wall-clock speedup against MAC reduction, per gate family",
                  source="Skip-Conv Table 2, VA-RED² Table 4.1 (speed); D-STEP: none",
                  requires=("gate_fronts", "dstep_target", "vared2_space"))
def run(ctx) -> Finding:
    if not ctx.candidates:
        raise RuntimeError("no gated model to time: findings 2, 5 and 6 did not finish")
    timed = {}
    for family, c in ctx.candidates.items():
        clip = ctx.timed_clip(c.spec)
        timed[family] = ctx.time(c.dense, c.gated, clip, reset_every=c.spec.clip_length)
        ctx.step(f"{family} ({c.label}): {timed[family]['speedup']:.2f}× at "
                 f"{timed[family]['mac_reduction']:.2f}× fewer MACs")
    claims = []
    for family, t in timed.items():
        paper_name, paper_eff = PAPER.get(family, (family, None))
        c = ctx.candidates[family]
        drop = 100 * (c.dense_score.quality - c.score.quality)
        need = f"and efficiency ≥ {paper_eff:.2f}" if paper_eff else ""
        claims.append(Claim(
            statement=f"{family}: the MAC reduction turns into a wall-clock speedup",
            paper=PAPER_TEXT[paper_name],
            ours=f"{t['speedup']:.2f}× at {t['mac_reduction']:.2f}× fewer MACs, efficiency {t['efficiency']:.2f} "
                 f"({c.label}; {drop:+.1f} points vs dense)",
            reproduced=t["speedup"] > 1.0 and (paper_eff is None or t["efficiency"] >= paper_eff),
            rule=f"speedup > 1 {need}".strip(),
        ))
    rows = ["| family | operating point | network | quality lost (points) | dense ms | gated ms | speedup | "
            "MAC reduction | efficiency | rel. error vs dense (median / max) | agreement with dense | max abs diff |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    numbers = {}
    for family, t in timed.items():
        c = ctx.candidates[family]
        drop = 100 * (c.dense_score.quality - c.score.quality)
        rows.append(f"| {family} | {c.label} | {c.spec.backbone} {c.spec.size}² | {drop:+.1f} | {t['dense_ms']:.2f} "
                    f"| {t['gated_ms']:.2f} | {t['speedup']:.2f}× | {t['mac_reduction']:.2f}× | "
                    f"{t['efficiency']:.2f} | {t['rel_error_median']:.2%} / {t['rel_error_max']:.2%} | "
                    f"{t['agreement']:.0%} ({t['agreement_kind']}) | {t['max_abs_diff']:.1e} |")
        numbers.update({f"{family}.speedup": t["speedup"], f"{family}.mac_reduction": t["mac_reduction"],
                        f"{family}.efficiency": t["efficiency"], f"{family}.dense_ms": t["dense_ms"],
                        f"{family}.gated_ms": t["gated_ms"], f"{family}.quality_drop_points": drop,
                        f"{family}.rel_error_median": t["rel_error_median"], f"{family}.agreement": t["agreement"]})
    plot = line_plot(ctx.out / "wallclock.png", {f: [(t["mac_reduction"], t["speedup"])] for f, t in timed.items()},
                     xlabel="MAC reduction (×)", ylabel="wall-clock speedup (×)", diagonal=True,
                     title="Measured speedup against MAC reduction")
    p = ctx.profile
    setup = (f"each family's operating point from findings 2, 5, 6; timed on {ctx.clip_source()} at each network's "
             f"frame size with a reference frame (window) every T frames, {p.timing.repeats} interleaved rounds, "
             f"{ctx.threads()} threads, device lock held; rel. error and agreement (top-1 class or PCK hit of the "
             "dense peak) against the dense network on the same clip, frame by frame (``objectives.fidelity``); max "
             "abs diff: the gated stream against its masked dense formulation")
    return Finding(claims=tuple(claims), numbers=numbers, setup=setup, details="\n".join(rows), plots=(plot,))
