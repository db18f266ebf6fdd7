"""``gatesearch bench``: a gated model against its dense twin, side by side — speed, MACs, fidelity.

The measurements live in ``objectives`` (``bench``, ``fidelity``); this package turns one frozen
``BenchConfig`` into the twins, the footage and a result (``run_bench``), and a result into lines and a plot.
"""

from .config import BenchConfig, BenchError, gate_knobs, parse_knobs, parse_values
from .report import lines, plot_sweep, sweep_table
from .run import load_clip, run_bench

__all__ = ["BenchConfig", "BenchError", "gate_knobs", "lines", "load_clip", "parse_knobs", "parse_values", "plot_sweep",
           "run_bench", "sweep_table"]
