"""D-STEP controllability (paper Table 1) and wall-clock speed against the dense backbone.

    python benchmarks/dstep_controllability.py [--targets 0.4 0.6 0.8] [--tile 2] [--epochs 6] [--threads 1]
                                               [--speed-size 224] [--no-speed] [--json]

Controllability: for each target FLOPs ratio D, one trial (``run_trial``) trains
resnet18_tiny with ``gate: dstep`` on the synthetic task, then the held-out
clips are streamed again and the achieved F/F_S (Eq. 2 over the gated blocks,
policy networks included) is printed next to D, with MacCounter's count of
the same layers as a cross-check, top-1, and what the gates chose (active-tile
fraction, skip / reuse / compute channel fractions). The bar: |F/F_S − D| ≤ 0.05.

Speed: the trained D = 0.4 model is timed against its dense twin (same
weights, gates off) with ``objectives.bench.bench_model`` (interleaved rounds,
median of per-round ratios), at the training resolution and, because a 64×64
tiny net is all per-op overhead, on full-width ResNet-18 frames of
``--speed-size`` pixels carrying the trained tiny model's decisions rate:
the full-size model's policies are set (one logit offset, found by bisection)
to the achieved ratio of the trained model. Ratios are what to compare;
absolute times depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def trial_config(target: float, *, tile: int, epochs: int, seed: int):
    from gatesearch.spaces import TrialConfig

    return TrialConfig(backbone="resnet18_tiny", gate="dstep", target_flops_ratio=target, block_size=tile,
                       epochs=epochs, clip_length=4, seed=seed)


def achieved(model, clips: dict, *, reset_every: int) -> dict:
    """Stream held-out clips: achieved F/F_S, MacCounter's ratio over the same layers, decisions."""
    from gatesearch.objectives import MacCounter
    from gatesearch.policies.dstep import decisions, flops_ratio

    model.eval()
    counter = MacCounter(model, tuple(clips["clip"].shape[2:]))
    counter.reset()
    with torch.inference_mode():
        for start in range(0, len(clips["clip"]), 8):
            model.stream(clips["clip"][start : start + 8], reset_every=reset_every)
    report = counter.report()
    layers = report.layers.values()
    mac_ratio = sum(l.effective for l in layers) / sum(l.dense for l in layers)
    return {"ratio": flops_ratio(model), "mac_counter_ratio": mac_ratio, "model_mac_reduction": report.reduction,
            **decisions(model)}


def controllability(targets, *, tile: int, epochs: int, seed: int) -> tuple[list[dict], dict]:
    from gatesearch.data.source import load_clips
    from gatesearch.search.trial import run_trial
    from gatesearch.spaces import DataConfig, EvalConfig

    data, evaluation = DataConfig(), EvalConfig(latency_warmup=1, latency_repeats=3)
    val = load_clips(data, frames=evaluation.frames, count=data.val_clips, split="val")
    rows, models = [], {}
    for target in targets:
        cfg = trial_config(target, tile=tile, epochs=epochs, seed=seed)
        t0 = time.perf_counter()
        outcome = run_trial(cfg, data, evaluation)
        row = {"target": target, "tile": tile, "top1": outcome.metrics["quality"],
               **achieved(outcome.model, val, reset_every=cfg.clip_length), "train_s": time.perf_counter() - t0}
        row["error"] = row["ratio"] - target
        rows.append(row)
        models[target] = (outcome.model, val, cfg)
        print(f"D={target:.2f} p={tile}  achieved F/F_S={row['ratio']:.3f} (MacCounter {row['mac_counter_ratio']:.3f})"
              f"  error {row['error']:+.3f}  top-1 {row['top1']:.3f}  tiles {row['tiles']:.2f}"
              f"  skip/reuse/compute {row['skip']:.2f}/{row['reuse']:.2f}/{row['compute']:.2f}"
              f"  ({row['train_s']:.0f} s)", flush=True)
    return rows, models


def calibrate_offsets(model, clip, target: float, compute: float, *, reset_every: int, steps: int = 12) -> dict:
    """Shift every block's logits so the stream computes a ``compute`` fraction of channels and hits F/F_S = ``target``.

    Two bisections: the "compute" logit offset first (all tiles active), then
    the spatial offset. The policies' own weights are untouched, so which
    tiles and channels go still depends on the frames.
    """
    from gatesearch.objectives import reset_stats
    from gatesearch.policies.dstep import decisions, dstep_blocks, flops_ratio
    from gatesearch.policies.dstep_block import COMPUTE

    blocks = dstep_blocks(model)
    base = [(b.policy.spatial_bias.detach().clone(), b.policy.fc2_bias.detach().clone()) for b in blocks]

    def run(spatial_offset: float, compute_offset: float) -> dict:
        with torch.no_grad():
            for b, (spatial, fc2) in zip(blocks, base):
                b.policy.spatial_bias.copy_(spatial + spatial_offset / b.policy.gain)
                b.policy.fc2_bias.copy_(fc2)
                b.policy.fc2_bias.view(-1, 3)[:, COMPUTE] += compute_offset / b.policy.gain
        reset_stats(model)
        with torch.inference_mode():
            model.stream(clip, reset_every=reset_every)
        return {"ratio": flops_ratio(model), **decisions(model)}

    def bisect(measure, goal: float) -> float:  # measure increases with the offset
        lo, hi = -10.0, 10.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if measure(mid) > goal else (mid, hi)
        return (lo + hi) / 2

    compute_offset = bisect(lambda o: run(20.0, o)["compute"], compute)
    spatial_offset = bisect(lambda o: run(o, compute_offset)["ratio"], target)
    return {"spatial_offset": spatial_offset, "compute_offset": compute_offset, **run(spatial_offset, compute_offset)}


def speed(model, clip, *, reset_every: int, repeats: int) -> dict:
    from gatesearch.objectives import reset_stats
    from gatesearch.objectives.bench import bench_model
    from gatesearch.policies.dstep import decisions, flops_ratio, set_gating

    dense = copy.deepcopy(model)
    set_gating(dense, False)
    reset_stats(model)
    with torch.inference_mode():
        model.eval().stream(clip, reset_every=reset_every)
    ratio, chosen = flops_ratio(model), decisions(model)
    result = bench_model(dense, model, clip, reset_every=reset_every, repeats=repeats)
    return {"ratio": ratio, **chosen, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.6, 0.8])
    parser.add_argument("--tile", type=int, default=2, help="tile size p (the joint space's block_size)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--speed-size", type=int, default=224, help="frame size of the full-size speed check")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows, models = controllability(args.targets, tile=args.tile, epochs=args.epochs, seed=args.seed)
    worst = max(abs(r["error"]) for r in rows)
    print(f"controllability: worst |F/F_S - D| = {worst:.3f} (bar 0.05): {'PASS' if worst <= 0.05 else 'FAIL'}")
    out = {"controllability": rows}
    if not args.no_speed:
        target = min(models, key=lambda d: abs(d - 0.4))
        model, val, cfg = models[target]
        tiny = speed(model, val["clip"][:1], reset_every=cfg.clip_length, repeats=args.repeats)
        print(f"speed, trained resnet18_tiny D={target} at 64x64: F/F_S {tiny['ratio']:.3f}, "
              f"dense {tiny['dense_ms']:.2f} ms, gated {tiny['gated_ms']:.2f} ms, speedup {tiny['speedup']:.2f}x")
        out["speed_tiny"] = tiny
        big = full_size_speed(target=0.4, compute=tiny["compute"], tile=args.tile, size=args.speed_size,
                              reset_every=cfg.clip_length, repeats=args.repeats)
        print(f"speed, resnet18 at {args.speed_size}x{args.speed_size}, F/F_S {big['ratio']:.3f} "
              f"(tiles {big['tiles']:.2f}, skip/reuse/compute {big['skip']:.2f}/{big['reuse']:.2f}/{big['compute']:.2f}): "
              f"dense {big['dense_ms']:.1f} ms, gated {big['gated_ms']:.1f} ms, speedup {big['speedup']:.2f}x "
              f"(bar 1.5x at 0.4), max abs diff vs masked dense {big['max_abs_diff']:.1e}")
        out["speed_full"] = big
    if args.json:
        print(json.dumps(out, default=float))
    return 0


def full_size_speed(*, target: float, compute: float, tile: int, size: int, reset_every: int, repeats: int) -> dict:
    """Full-width ResNet-18 with D-STEP at ``size``², its decisions offset to F/F_S = ``target``
    with a ``compute`` fraction of channels computed (the trained tiny model's rates)."""
    from gatesearch.backbones import build
    from gatesearch.data import SyntheticConfig, make_clip
    from gatesearch.policies import build_policy

    torch.manual_seed(0)
    model = build("resnet18", task="classification", num_classes=12)
    build_policy("dstep", target_flops_ratio=target, block_size=tile).apply(model)
    model.eval()
    clip = make_clip(SyntheticConfig(height=size, width=size, frames=8), 0, "test")["clip"][None]
    offsets = calibrate_offsets(model, clip[:, :reset_every], target, compute, reset_every=reset_every)
    return {**offsets, **speed(model, clip, reset_every=reset_every, repeats=repeats)}


if __name__ == "__main__":
    sys.exit(main())
