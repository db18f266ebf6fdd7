"""Single-layer wall-clock benchmark: gate + block-sparse Skip-Conv step vs the best dense conv.

    python benchmarks/layer_bench.py --channels 64 --size 56 --kernel 3 --block 8 --density 0.1 --threads 2 [--json]

Prints, per density, the native frame step's and the per-layer path's rows
(gate included) against the faster of contiguous / channels_last dense
``F.conv2d``: the density fired, the speedup by median and by fastest run,
and the max abs diff against the masked dense formulation (``--json``: the
whole result, per layout). Ratios are what to compare; absolute times depend
on the machine and on anything else running on it.
"""

from __future__ import annotations

import argparse
import json
import sys

from gatesearch.ops.bench import bench_layer, layer_table


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

    results = [bench_layer(args.channels, args.size, args.kernel, args.block, density, args.threads, args.repeats)
               for density in args.density]
    if args.json:
        for result in results:
            print(json.dumps(result))
    else:
        print("\n".join(layer_table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
