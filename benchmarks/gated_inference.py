"""Gated inference against the dense twin: the targets of issue 18, measured side by side.

    python benchmarks/gated_inference.py                      # every suite
    python benchmarks/gated_inference.py --suite small --suite threads --frames 64 --json

Suites (random weights, input-norm gate with block reference + per-value ε, b = 4, as `gatesearch bench
--gate input_norm -p reference=block -p per_value=true`; dense and gated stream the same clip in one
process, interleaved rounds, speedup = median of per-round ratios; efficiency = speedup / MAC reduction):

  resnet18     ResNet-18 224² on vtest.avi: efficiency ≥ 0.6 wherever the MAC reduction is ≤ 8×
  mobilenet_v2 MobileNetV2 224² (synthetic clip and vtest.avi): efficiency ≥ 0.4 up to 8×
  small        tiny 64², resnet18_tiny 64², mobilenet_v2_tiny 112² (synthetic): gated ≥ 0.95× dense at every
               ε, and ≥ 1.5× where the MAC reduction is ≥ 5×
  threads      ResNet-18 224² on vtest.avi at 1 and 2 threads in alternating rounds: the gated path's gain
               from the second core (t1 / t2 − 1, median of per-round ratios) ≥ 80 % of the dense path's
  layer        one 64-channel 56² 3×3 'same' layer, 8×8 blocks, 2 threads: ≥ 3× at 10 % block density, ≥ 2× at
               25 % (issue 4's bars), on the native frame step (a one-layer model fed frames that alternate so
               every frame recomputes the same blocks) and on the per-layer path; b = 4 rows without a bar; the
               frame step's second-core share (1 and 2 threads alternating, b = 8)
  dstep        D-STEP (p = 2, random weights, every block's logit offset trimmed so the clip streams at
               F/F_S ≈ 0.8 / 0.6 / 0.4; policies that skip tiles, and ones that split channels over skip /
               reuse / compute), resnet18_tiny 64² and hrnet_small 64² heatmap (synthetic): the blocks
               layer by layer (DStepBlock._infer) and on the native frame step (one plan step per block), each
               against the dense twin in the same interleaved rounds; no bar (issue 18: "where it applies")

Every row also reports the largest difference to the masked dense formulation (≤ 1e-4 × max(1, |output|)).
Real clips (vtest.avi, tree.avi, Megamind.avi) come from the `opencv-doc` Debian package: looked up in
--clips, else fetched with `apt-get download opencv-doc` + `dpkg -x` into that folder; rows that need a
missing clip say so and are skipped. Timings move with whatever else runs on the machine: compare ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CLIPS = ("vtest.avi", "tree.avi", "Megamind.avi")
SMALL = (("tiny", 64), ("resnet18_tiny", 64), ("mobilenet_v2_tiny", 112))
SMALL_EPS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
LARGE_EPS = (0.01, 0.02, 0.03, 0.05)


def default_clip_dir() -> Path:
    env = os.environ.get("GATESEARCH_CLIPS")
    return Path(env) if env else Path.home() / ".cache" / "gatesearch" / "clips"


def find_clip(name: str, folder: Path, log) -> Path | None:
    """``folder/name``, fetched from the opencv-doc package when absent; None (and a line saying why) if that fails."""
    path = folder / name
    if path.exists():
        return path
    log(f"{name} not in {folder}: fetching the opencv-doc package (apt-get download opencv-doc, dpkg -x)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("opencv-doc*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True, capture_output=True)
            folder.mkdir(parents=True, exist_ok=True)
            for clip in CLIPS:
                found = next((Path(tmp) / "x").rglob(clip), None)
                if found is not None:
                    shutil.copy(found, folder / clip)
    except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
        log(f"{name} is missing and could not be fetched ({type(exc).__name__}: {exc}); its rows are skipped")
        return None
    if not path.exists():
        log(f"{name} is not in the opencv-doc package; its rows are skipped")
        return None
    return path


def load_clip(source: str, size: int, frames: int, clip_dir: Path, log) -> torch.Tensor | None:
    """(1, T, 3, size, size): a synthetic clip, or the first frames of a real one resized."""
    if source == "synthetic":
        from gatesearch.data import SyntheticConfig, make_clip

        return make_clip(SyntheticConfig(height=size, width=size, frames=frames), 0, "test")["clip"][None]
    from gatesearch.data import read_frames

    path = find_clip(source, clip_dir, log)
    return None if path is None else read_frames(path, max_frames=frames, size=(size, size))[None]


def models(backbone: str, eps: float, block: int):
    """(dense, gated): random weights shared, the gate as `gatesearch bench` builds it."""
    from gatesearch.models import build_model
    from gatesearch.policies import build_policy
    from gatesearch.spaces import TrialConfig

    torch.manual_seed(0)
    dense = build_model(TrialConfig(backbone=backbone), 12).eval()
    gated = build_policy("input_norm", threshold=eps, block_size=block, reference="block",
                         per_value=True).apply(copy.deepcopy(dense)).eval()
    return dense, gated


def measure(backbone: str, size: int, source: str, eps: float, args, log, threads: int | None = None) -> dict | None:
    from gatesearch.objectives.bench import bench_model

    clip = load_clip(source, size, args.frames, args.clips, log)
    if clip is None:
        return None
    torch.set_num_threads(threads or args.threads)
    dense, gated = models(backbone, eps, args.block)
    result = bench_model(dense, gated, clip, reset_every=None, repeats=args.repeats)
    with torch.inference_mode():
        scale = max(1.0, float(dense.stream(clip).abs().max())) if result["max_abs_diff"] > 1e-4 else 1.0
    return {"backbone": backbone, "size": size, "clip": source, "eps": eps, **result,
            "exact": result["max_abs_diff"] <= 1e-4 * scale}


def suite_resnet18(args, log):
    for eps in args.eps or LARGE_EPS:
        row = measure("resnet18", 224, "vtest.avi", eps, args, log)
        if row:
            row["target"] = "efficiency >= 0.6 (MAC <= 8x)"
            row["met"] = row["efficiency"] >= 0.6 if row["mac_reduction"] <= 8 else None
            yield row


def suite_mobilenet_v2(args, log):
    for source in ("synthetic", "vtest.avi"):
        for eps in args.eps or LARGE_EPS:
            row = measure("mobilenet_v2", 224, source, eps, args, log)
            if row:
                row["target"] = "efficiency >= 0.4 (MAC <= 8x)"
                row["met"] = row["efficiency"] >= 0.4 if row["mac_reduction"] <= 8 else None
                yield row


def suite_small(args, log):
    for backbone, size in SMALL:
        for eps in args.eps or SMALL_EPS:
            row = measure(backbone, size, "synthetic", eps, args, log)
            if row:
                row["target"] = ">= 0.95x, >= 1.5x where MAC >= 5x"
                row["met"] = row["speedup"] >= (1.5 if row["mac_reduction"] >= 5 else 0.95)
                yield row


def suite_threads(args, log):
    """1 and 2 threads in alternating rounds on the same models (dense 1, gated 1, dense 2, gated 2, ...), so a
    change in load hits both thread counts; each gain is the median of per-round ratios."""
    import statistics
    import time

    eps = (args.eps or (0.02,))[0]
    clip = load_clip("vtest.avi", 224, args.frames, args.clips, log)
    if clip is None:
        return
    dense, gated = models("resnet18", eps, args.block)
    ms: dict[tuple[str, int], list[float]] = {(m, t): [] for m in ("dense", "gated") for t in (1, 2)}
    with torch.inference_mode():
        for rnd in range(2 + args.repeats):  # two warm-up rounds
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for label, model in (("dense", dense), ("gated", gated)):
                    start = time.perf_counter()
                    model.stream(clip)
                    if rnd >= 2:
                        ms[label, threads].append(1000 * (time.perf_counter() - start) / clip.shape[1])
    torch.set_num_threads(args.threads)

    def gain(label):
        return statistics.median(a / b for a, b in zip(ms[label, 1], ms[label, 2]))

    dense_gain, gated_gain = gain("dense"), gain("gated")
    share = (gated_gain - 1) / (dense_gain - 1) if dense_gain > 1 else float("nan")
    med = {key: statistics.median(v) for key, v in ms.items()}
    yield {"backbone": "resnet18", "size": 224, "clip": "vtest.avi", "eps": eps, "threads": "1->2",
           "dense_ms_1": med["dense", 1], "dense_ms_2": med["dense", 2], "gated_ms_1": med["gated", 1],
           "gated_ms_2": med["gated", 2], "dense_gain": dense_gain, "gated_gain": gated_gain,
           "gain_share": share, "target": "gated gain >= 80 % of dense gain", "met": share >= 0.8}


def suite_layer(args, log):
    from gatesearch.ops.bench import DENSITIES, bench_layer, bench_layer_threads, layer_rows

    for block in (8, 4):  # issue 4's bar is at b = 8; b = 4 is the extra row
        for density in DENSITIES:
            r = bench_layer(channels=64, size=56, kernel=3, block=block, density=density, threads=args.threads,
                            repeats=100)
            for row in layer_rows(r):  # bars only at b = 8 (issue 4's layer)
                bar = row["bar"]
                yield {"layer": f"64ch 56² 3x3 b{block}", **row, "threads": r["threads"],
                       "target": f">= {bar:g}x" if bar else "no bar", "met": row["met"]}
    for density in DENSITIES:  # the second core: 1 and 2 threads alternating round by round
        r = bench_layer_threads(channels=64, size=56, kernel=3, block=8, density=density, repeats=100)
        yield {"layer_threads": f"64ch 56² 3x3 b8 at {density:.0%}", **r}


DSTEP = (("resnet18_tiny", "classification", 64), ("hrnet_small", "heatmap", 64))
#: policies with random weights, trimmed by one logit offset: "tiles" (the default "compute" bias of 3: every
#: channel computed, tiles skipped) and "channels" (no "compute" bias: channels split over skip / reuse / compute)
DSTEP_VARIANTS = {"tiles": (0.8, 0.6, 0.4), "channels": (0.6, 0.4)}


def trim_offsets(model, clip: torch.Tensor, target: float, steps: int = 12) -> float:
    """One common logit offset for every D-STEP block (bisection) so ``clip`` streams at F/F_S ≈ ``target``."""
    from gatesearch.objectives import reset_stats
    from gatesearch.policies.dstep import dstep_blocks, flops_ratio

    blocks = dstep_blocks(model)

    def ratio(offset: float) -> float:
        for b in blocks:
            b.policy.offset.fill_(offset)
        reset_stats(model)
        with torch.inference_mode():
            model.stream(clip)
        return flops_ratio(model)

    lo, hi = -8.0, 8.0  # F/F_S grows with the offset
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ratio(mid) > target else (mid, hi)
    return ratio((lo + hi) / 2)


def suite_dstep(args, log):
    from gatesearch.models import build_model
    from gatesearch.objectives.bench import bench_models
    from gatesearch.policies.dstep import DStep, DStepSettings, decisions
    from gatesearch.spaces import TrialConfig

    torch.set_num_threads(args.threads)
    for backbone, task, size in DSTEP:
        clip = load_clip("synthetic", size, args.frames, args.clips, log)
        torch.manual_seed(0)
        dense = build_model(TrialConfig(backbone=backbone, task=task), 12).eval()
        for variant, ratios in DSTEP_VARIANTS.items():
            settings = DStepSettings(compute_init=3.0 if variant == "tiles" else 0.0)
            native = DStep(settings=settings, target_flops_ratio=0.6, block_size=2).apply(copy.deepcopy(dense)).eval()
            for target in ratios:
                ratio = trim_offsets(native, clip, target)
                chosen = decisions(native)
                layers = copy.deepcopy(native)
                layers.frame_runner = None  # every block runs DStepBlock._infer
                rows = bench_models(dense, {"layers": layers, "native": native}, clip, reset_every=None,
                                    repeats=args.repeats)
                for label, row in rows.items():
                    yield {"backbone": f"{backbone} dstep/{variant} {label}", "size": size, "clip": "synthetic",
                           "eps": f"F/F_S {ratio:.2f}", "frames": clip.shape[1], "threads": args.threads, **row,
                           "decisions": chosen, "exact": row["max_abs_diff"] <= 1e-4, "target": "no bar",
                           "met": None}


SUITES = {"resnet18": suite_resnet18, "mobilenet_v2": suite_mobilenet_v2, "small": suite_small,
          "threads": suite_threads, "layer": suite_layer, "dstep": suite_dstep}


def show(row: dict) -> str:
    verdict = {True: "met", False: "NOT met", None: "-"}[row.get("met")]
    if "layer_threads" in row:
        return (f"layer {row['layer_threads']} frame step, 1 -> 2 threads: dense {row['dense_ms_1']:.3f} -> "
                f"{row['dense_ms_2']:.3f} ms ({row['dense_gain']:.2f}x), frame step {row['gated_ms_1']:.3f} -> "
                f"{row['gated_ms_2']:.3f} ms ({row['gated_gain']:.2f}x), share {row['gain_share']:.2f}; speedup "
                f"{row['speedup_1']:.2f}x / {row['speedup_2']:.2f}x")
    if "gain_share" in row:
        return (f"threads {row['backbone']} {row['size']}² {row['clip']} ε {row['eps']}: dense "
                f"{row['dense_ms_1']:.2f} -> {row['dense_ms_2']:.2f} ms ({row['dense_gain']:.2f}x), gated "
                f"{row['gated_ms_1']:.2f} -> {row['gated_ms_2']:.2f} ms ({row['gated_gain']:.2f}x), share "
                f"{row['gain_share']:.2f}  [{row['target']}: {verdict}]")
    if "layer" in row:
        dense_diff = "" if row["max_abs_diff_dense"] is None else f", to the dense conv {row['max_abs_diff_dense']:.1e}"
        return (f"layer {row['layer']} {row['path']:10s} {row['threads']} threads, density {row['density']:.3f} "
                f"(asked {row['requested_density']:.2f}): dense {row['dense_ms']:.3f} ms, gated {row['gated_ms']:.3f} "
                f"ms, {row['speedup']:.2f}x (min-based {row['speedup_min']:.2f}x), max |diff| to the masked "
                f"formulation {row['max_abs_diff']:.1e}{dense_diff}  [{row['target']}: {verdict}]")
    point = row["eps"] if isinstance(row["eps"], str) else f"ε {row['eps']:<5}"  # D-STEP rows: their F/F_S
    return (f"{row['backbone']:17s} {row['size']:3d}² {row['clip']:9s} {point} "
            f"dense {row['dense_ms']:7.3f} ms  gated {row['gated_ms']:7.3f} ms  {row['speedup']:5.2f}x  "
            f"MAC {row['mac_reduction']:5.2f}x  "
            f"eff {row['efficiency']:.2f}  |diff| {row['max_abs_diff']:.1e}{'' if row['exact'] else ' INEXACT'}"
            f"  [{row['target']}: {verdict}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="repeatable; default: all")
    parser.add_argument("--eps", type=float, action="append", help="thresholds (repeatable; default per suite)")
    parser.add_argument("--frames", type=int, default=64, help="frames per clip (one dense reference frame)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--clips", type=Path, default=default_clip_dir(), help="folder of the opencv-doc clips")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    for name in args.suite or list(SUITES):
        for row in SUITES[name](args, log):
            print(json.dumps(row) if args.json else show(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
