"""Where a streamed D-STEP frame spends its time: the per-layer path by function, the native plan by step.

    python benchmarks/dstep_profile.py hrnet_small heatmap --ratio 0.4
    python benchmarks/dstep_profile.py resnet18_tiny classification --ratio 0.4

Random weights, tile p = 2, every block's logit offset trimmed so the synthetic 64² clip streams at F/F_S ≈
``--ratio`` (``gated_inference.trim_offsets``). Prints ms/frame of the dense twin, the per-layer path
(``DStepBlock._infer``) and the native plan (median of interleaved rounds), the per-layer path's self time by
function (cProfile: the conv / BN / pool kernels against everything else) and the plan's time by step and by
kind of work (``FramePlan.set_profiling``). Timings move with the machine's load: compare within one run.
"""

from __future__ import annotations

import argparse
import collections
import copy
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gated_inference import trim_offsets

KERNELS = ("conv2d", "block_sparse", "batch_norm", "max_pool")


def per_frame_ms(model, clip) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model.stream(clip)
    return 1000.0 * (time.perf_counter() - start) / clip.shape[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    parser.add_argument("task", choices=["classification", "heatmap"])
    parser.add_argument("--ratio", type=float, default=0.4, help="F/F_S the offsets are trimmed to")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from gatesearch.data import SyntheticConfig, make_clip
    from gatesearch.models import build_model
    from gatesearch.policies import build_policy
    from gatesearch.policies.dstep import decisions
    from gatesearch.spaces import TrialConfig

    torch.set_num_threads(args.threads)
    clip = make_clip(SyntheticConfig(height=args.size, width=args.size, frames=args.frames), 0, "test")["clip"][None]
    torch.manual_seed(0)
    dense = build_model(TrialConfig(backbone=args.backbone, task=args.task), 12).eval()
    native = build_policy("dstep", target_flops_ratio=0.6, block_size=2).apply(copy.deepcopy(dense)).eval()
    ratio = trim_offsets(native, clip, args.ratio)
    layers = copy.deepcopy(native)
    layers.frame_runner = None
    chosen = {k: round(v, 2) for k, v in decisions(native).items()}
    print(f"{args.backbone} {args.task} {args.size}² p 2, F/F_S {ratio:.3f}, decisions {chosen}")

    models = {"dense": dense, "layers": layers, "native": native}
    for m in models.values():
        per_frame_ms(m, clip)
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for label, m in models.items():
            times[label].append(per_frame_ms(m, clip))
    ms = {label: round(statistics.median(v), 2) for label, v in times.items()}
    speed = {label: round(statistics.median(d / g for d, g in zip(times["dense"], times[label])), 2)
             for label in ("layers", "native")}
    print(f"  ms/frame {ms}, speedup against dense {speed}")

    profiler = cProfile.Profile()
    with torch.inference_mode():
        profiler.enable()
        layers.stream(clip)
        profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = sum(v[2] for v in stats.values())
    by_function = collections.Counter()
    for (path, _, name), v in stats.items():
        by_function[name if path == "~" else f"{Path(path).name}:{name}"] += v[2]
    kernels = sum(v for k, v in by_function.items() if any(word in k for word in KERNELS))
    print(f"  per-layer path: kernels (conv / BN / pool) {100 * kernels / total:.0f}% of self time, the rest "
          f"{100 - 100 * kernels / total:.0f}%; top functions:")
    for name, v in by_function.most_common(8):
        print(f"    {100 * v / total:5.1f}%  {name}")

    plan = native.frame_runner._program
    plan.plan.set_profiling(True)
    plan.plan.step_timings(), plan.plan.timings()
    per_frame_ms(native, clip)
    plan.plan.set_profiling(False)
    steps, kinds = plan.plan.step_timings(), plan.plan.timings()
    spent = sum(steps)
    planned = {id(s.block) for s in plan.dsteps}
    names = {name.replace(".", "_") for name, m in native.frame_runner._root.named_modules() if id(m) in planned}
    blocks = sum(t for t, name in zip(steps, plan.step_names) if name in names)
    shares = {k: round(100 * v / spent) for k, v in kinds.items() if v > 0.005 * spent}
    print(f"  native plan: {1000 * spent / args.frames:.2f} ms/frame in its steps, D-STEP blocks "
          f"{100 * blocks / spent:.0f}%; by kind (%) {shares}")
    top = sorted(zip(plan.step_names, steps), key=lambda p: -p[1])[:6]
    print("    top steps:", ", ".join(f"{name} {100 * t / spent:.0f}%" for name, t in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
