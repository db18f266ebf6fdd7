"""Single-layer wall-clock benchmark: gate + block-sparse Skip-Conv step vs the best dense conv.

    python benchmarks/layer_bench.py --channels 64 --size 56 --kernel 3 --block 8 --density 0.1 --threads 2 [--json]

Prints the dense time (faster of contiguous / channels_last), the sparse time
per layout (norm gate included), the speedup of best vs best, the crossover
density that path="auto" uses, and the max abs diff against the masked dense
reference. Ratios are what to compare; absolute times depend on the machine
and on anything else running on it.
"""

from __future__ import annotations

import argparse
import json
import sys

from gatesearch.ops.bench import bench_layer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--density", type=float, nargs="+", default=[0.1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="one JSON object per density")
    args = parser.parse_args(argv)

    for density in args.density:
        result = bench_layer(args.channels, args.size, args.kernel, args.block, density, args.threads, args.repeats)
        if args.json:
            print(json.dumps(result))
            continue
        print(
            f"C={result['channels']} {result['size']}x{result['size']} k={result['kernel']} b={result['block']} "
            f"threads={result['threads']} native={result['native']} density={result['density']:.3f}"
        )
        for layout in result["dense_ms"]:
            print(
                f"  {layout:13s} dense {result['dense_ms'][layout]:7.3f} ms"
                f"   sparse {result['sparse_ms'][layout]:7.3f} ms"
                f"   auto {result['auto_ms'][layout]:7.3f} ms   crossover {result['crossover'][layout]:.2f}"
            )
        print(
            f"  speedup {result['speedup']:.2f}x by median (dense {result['best_dense_ms']:.3f} ms / sparse "
            f"{result['best_sparse_ms']:.3f} ms), {result['speedup_min']:.2f}x by fastest run   "
            f"max abs diff {result['max_abs_diff']:.1e}   load {result['loadavg_1min']:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
