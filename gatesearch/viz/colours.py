"""One colour per gate, the same in every plot (a user comparing two plots compares gates, not palettes)."""

from __future__ import annotations

import zlib

#: the built-in gates (matplotlib's tab10, dense in grey)
GATE_COLOURS = {
    "dense": "#7f7f7f",
    "input_norm": "#1f77b4",
    "output_norm": "#ff7f0e",
    "gumbel": "#2ca02c",
    "dstep": "#d62728",
    "vared2": "#9467bd",
}
#: plugin gates: picked by a hash of the name, so a gate keeps its colour from one search to the next
OTHER_COLOURS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39")


def gate_colour(gate: str) -> str:
    """The gate's colour as a hex string."""
    return GATE_COLOURS.get(gate) or OTHER_COLOURS[zlib.crc32(gate.encode()) % len(OTHER_COLOURS)]
