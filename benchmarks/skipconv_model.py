"""Issue 4 bar: a whole gated ResNet on a real (decoded mp4) clip, against its dense twin.

1. Train the dense backbone on the synthetic task (norm gates need no training
   of their own: Skip-Convolutions, Section 3.2.1). By default the label is
   the shape alone (``--directions 1``): a per-frame 2D network cannot tell
   the direction of motion, so with directions in the label its top-1 says
   little (ResNet-18 at 224² stayed at chance); on shapes it reaches 100 %.
2. Sweep the Skip-Conv threshold ε and keep the largest one whose held-out
   top-1 stays within one point of dense.
3. Write held-out clips to mp4, decode one back (a real video path), and time
   dense vs gated side by side with ``gatesearch.objectives.bench.bench_model``.

Prints speedup, MAC reduction and efficiency (speedup / MAC reduction; the
paper reports 0.44-0.59 on a Xeon CPU, Table 2). Minutes on 2 cores at the
defaults; the full-size check takes about 25:

    python benchmarks/skipconv_model.py --backbone resnet18 --width 1 --size 224 --train-clips 768 \
        --val-clips 150 --epochs 3 --frames 64 --thresholds 2,3,4,5,6,8 --save runs/r18.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--directions", type=int, default=1, choices=[1, 2, 4, 8],
                    help="motion directions in the label (1: shape only, learnable frame by frame)")
    ap.add_argument("--gate", default="input_norm", choices=["input_norm", "output_norm"])
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--thresholds", default="0.5,1,2,4,8,16,32,64")
    ap.add_argument("--train-clips", type=int, default=256)
    ap.add_argument("--val-clips", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--frames", type=int, default=32, help="frames of the timed clip")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the timed streams (training uses all)")
    ap.add_argument("--save", type=Path, help="write the trained dense weights here")
    ap.add_argument("--load", type=Path, help="read the dense weights from here instead of training")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from gatesearch.data import read_frames, write_video
    from gatesearch.data.source import load_clips, num_classes
    from gatesearch.objectives.bench import bench_model
    from gatesearch.policies import build_policy
    from gatesearch.search.trial import build_model, evaluate, train
    from gatesearch.spaces import DataConfig, EvalConfig, TrialConfig

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    data = DataConfig(train_clips=args.train_clips, val_clips=args.val_clips,
                      synthetic={"height": args.size, "width": args.size, "num_directions": args.directions})
    trial = TrialConfig(backbone=args.backbone, width=args.width, clip_length=4, epochs=args.epochs, lr=args.lr)
    t0 = time.time()
    dense = build_model(trial, num_classes(data))
    if args.load:
        dense.load_state_dict(torch.load(args.load, weights_only=True))
    else:
        train(dense, trial, load_clips(data, split="train", frames=4, count=args.train_clips),
              on_epoch=lambda e, loss: print(f"  epoch {e + 1}: loss {loss:.3f}", flush=True))
        print(f"trained {args.backbone} (width {args.width}) at {args.size}px in {time.time() - t0:.0f} s", flush=True)
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dense.state_dict(), args.save)
    val = load_clips(data, split="val", frames=16, count=args.val_clips)
    quick = EvalConfig(frames=16, latency_warmup=0, latency_repeats=1, reference_every=0)
    base = evaluate(dense, trial, val, quick).metrics["quality"]
    print(f"dense top-1 {base:.3f} on {args.val_clips} clips", flush=True)

    chosen = None
    for eps in [float(x) for x in args.thresholds.split(",")]:
        gated = build_policy(args.gate, threshold=eps, block_size=args.block_size).apply(copy.deepcopy(dense))
        m = evaluate(gated, TrialConfig(**{**trial.to_dict(), "gate": args.gate, "threshold": eps,
                                           "block_size": args.block_size}), val, quick).metrics
        ok = m["quality"] >= base - 0.01
        print(f"  ε={eps:<6g} top-1 {m['quality']:.3f}  MAC reduction {m['mac_reduction']:.2f}  {'ok' if ok else 'too lossy'}",
              flush=True)
        if ok:
            chosen = (eps, gated)
    if chosen is None:
        raise SystemExit("no threshold keeps quality within one point")
    eps, gated = chosen

    with tempfile.TemporaryDirectory() as tmp:
        from gatesearch.data import SyntheticConfig, make_clip

        path = Path(tmp) / "clip.mp4"
        clip_cfg = SyntheticConfig(height=args.size, width=args.size, frames=args.frames, num_directions=args.directions)
        write_video(path, make_clip(clip_cfg, 0, "test")["clip"])
        clip = read_frames(path, size=(args.size, args.size))[None]  # decoded: codec noise included
    torch.set_num_threads(args.threads)
    result = bench_model(dense.eval(), gated.eval(), clip, reset_every=None, repeats=10)
    result.update(threshold=eps, dense_top1=base, backbone=args.backbone, width=args.width, size=args.size)
    if args.json:
        print(json.dumps(result))
    else:
        for k in ("threshold", "dense_ms", "gated_ms", "speedup", "mac_reduction", "efficiency", "mean_density", "max_abs_diff"):
            print(f"{k:>14}: {result[k]:.4g}")


if __name__ == "__main__":
    main()
