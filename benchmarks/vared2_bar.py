"""The VA-RED² bar of issue 7, end to end: R(2+1)D-tiny with S = 2 against its dense twin.

Both models are trained by ``gatesearch.search.trial.run_trial`` with the same
data, epochs, learning rate and seed, and evaluated on the same held-out clips
(quality, effective MACs per frame, per-layer density). Then
``objectives.bench.bench_model`` streams one held-out clip through both, side
by side (interleaved rounds, same thread count), for the wall-clock speedup.

The bar: effective MACs cut by 20-40 % at ≤ 1 point of top-1 lost, and a
measured speedup ≥ 0.6 × the MAC reduction (``efficiency`` in bench_model's
terms: speedup / (dense MACs / effective MACs)). The share of the MAC saving
that shows up as time saved is printed too.

    python benchmarks/vared2_bar.py                      # trains both (about 35 minutes on 2 cores)
    python benchmarks/vared2_bar.py --save runs/bar      # keep the trained weights
    python benchmarks/vared2_bar.py --load runs/bar      # re-measure without training
    python benchmarks/vared2_bar.py --dense-from runs/bar --lam 0.2   # another λ_e against the same dense model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lam", type=float, default=0.1, help="λ_e of Eq. 3.6 (the joint space's lambda_e)")
    p.add_argument("--space-size", type=int, default=2, help="S, alternatives per dimension")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--clip-length", type=int, default=8, help="frames per training clip and per deployed window")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-clips", type=int, default=640)
    p.add_argument("--val-clips", type=int, default=240, help="held-out clips (one clip = 100/N points)")
    p.add_argument("--size", type=int, default=112, help="frame height and width (R(2+1)D's input size)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--repeats", type=int, default=30, help="interleaved timing rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, help="write the trained weights here")
    p.add_argument("--load", type=Path, help="read trained weights from here instead of training")
    p.add_argument("--dense-from", type=Path, help="read only the dense baseline's weights from here (train vared2)")
    return p.parse_args()


def main() -> None:
    from gatesearch.data.source import load_clips, num_classes
    from gatesearch.models import build_model
    from gatesearch.objectives.bench import bench_model
    from gatesearch.search.trial import evaluate, run_trial
    from gatesearch.spaces import DataConfig, EvalConfig, TrialConfig

    args = parse()
    torch.set_num_threads(args.threads)
    data = DataConfig(train_clips=args.train_clips, val_clips=args.val_clips,
                      synthetic={"height": args.size, "width": args.size})
    evaluation = EvalConfig(latency_warmup=2, latency_repeats=10)
    dense_cfg = TrialConfig(backbone="r2plus1d_tiny", gate="dense", clip_length=args.clip_length, epochs=args.epochs,
                            lr=args.lr, seed=args.seed)
    gated_cfg = dataclasses.replace(dense_cfg, gate="vared2",
                                    knobs={"search_space_size": args.space_size, "lambda_e": args.lam})

    outcomes = {}
    for name, cfg in (("dense", dense_cfg), ("vared2", gated_cfg)):
        start = time.perf_counter()
        source = args.load or (args.dense_from if name == "dense" else None)
        if source:
            model = build_model(cfg, num_classes(data))
            model.load_state_dict(torch.load(source / f"{name}.pt", weights_only=True))
            val = load_clips(data, split="val", frames=evaluation.frames, count=data.val_clips)
            outcome = evaluate(model, cfg, val, evaluation)
        else:
            outcome = run_trial(
                cfg, data, evaluation,
                on_epoch=lambda e, loss, n=name: print(f"  {n} epoch {e + 1}: loss {loss:.3f}", flush=True),
            )
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                torch.save(outcome.model.state_dict(), args.save / f"{name}.pt")
        outcomes[name] = outcome
        m = outcome.metrics
        print(f"{name:7s} top-1 {100 * m['quality']:5.1f}%  {m['macs'] / 1e6:6.2f} MMACs/frame "
              f"(dense-equivalent {m['dense_macs'] / 1e6:.2f})  {m['latency_ms']:.2f} ms/frame  "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)

    dense, gated = outcomes["dense"], outcomes["vared2"]
    print("per-layer density (cost / dense cost, Eq. A.2, rebuilds included):")
    for layer, density in gated.layer_density.items():
        print(f"  {layer:34s} {density:.3f}")

    clip = load_clips(data, split="val", frames=evaluation.frames, count=1)["clip"]
    bench = bench_model(dense.model, gated.model, clip, reset_every=args.clip_length, repeats=args.repeats)

    mac_cut = 1 - gated.metrics["macs"] / dense.metrics["macs"]
    drop = 100 * (dense.metrics["quality"] - gated.metrics["quality"])
    time_cut = 1 - 1 / bench["speedup"]
    result = {
        "dense_top1": dense.metrics["quality"], "vared2_top1": gated.metrics["quality"], "top1_drop_points": drop,
        "dense_macs": dense.metrics["macs"], "vared2_macs": gated.metrics["macs"], "mac_cut": mac_cut,
        "mac_reduction": bench["mac_reduction"], "speedup": bench["speedup"], "efficiency": bench["efficiency"],
        "time_cut_over_mac_cut": time_cut / mac_cut if mac_cut > 0 else float("nan"),
        "dense_ms": bench["dense_ms"], "vared2_ms": bench["gated_ms"], "threads": bench["threads"],
        "val_clips": args.val_clips, "lam": args.lam,
    }
    print(f"MAC cut {100 * mac_cut:.1f}% (bar 20-40%): {'PASS' if 0.2 <= mac_cut <= 0.4 else 'FAIL'}")
    print(f"top-1 drop {drop:+.2f} points on {args.val_clips} clips (bar <= 1): {'PASS' if drop <= 1 else 'FAIL'}")
    print(f"speedup {bench['speedup']:.3f}x vs MAC reduction {bench['mac_reduction']:.3f}x: efficiency "
          f"{bench['efficiency']:.2f} (bar >= 0.6): {'PASS' if bench['efficiency'] >= 0.6 else 'FAIL'}; "
          f"time saved / MACs saved = {result['time_cut_over_mac_cut']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
