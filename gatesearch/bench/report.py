"""A bench result for people: key/value lines, the sweep as a table, and the speed–error plot."""

from __future__ import annotations

from pathlib import Path

# (header, key, format) of the sweep table
COLUMNS = (
    ("ε", "threshold", "{:>8.4g}"),
    ("MAC red.", "mac_reduction", "{:>8.2f}x"),
    ("speedup", "speedup", "{:>7.2f}x"),
    ("effic.", "efficiency", "{:>6.2f}"),
    ("err med", "rel_error_median", "{:>8.2e}"),
    ("err max", "rel_error_max", "{:>8.2e}"),
    ("agree", "agreement", "{:>6.3f}"),
    ("dense f/s", "dense_fps", "{:>9.1f}"),
    ("gated f/s", "gated_fps", "{:>9.1f}"),
)


def lines(result: dict) -> list[str]:
    """One ``key: value`` line per scalar, then the sweep table if there is one."""
    out = [f"{key:>18}: {value:.4g}" if isinstance(value, float) else f"{key:>18}: {value}"
           for key, value in result.items() if key not in ("sweep", "calibration")]
    if "sweep" in result:
        out += sweep_table(result["sweep"])
    calibrated = [row for row in result.get("sweep", [result]) if "calibration" in row]
    if calibrated:
        out += layer_table([row["calibration"] for row in calibrated])
    return out


def layer_table(records: list[dict]) -> list[str]:
    """Per layer, the ε each calibration found (one column per target) and what it measured there."""
    kind = records[0]["target"]
    targets = [f"{kind} {r['value']:g}" for r in records]
    header = f"{'layer':<32}" + "".join(f"  {t:>20}" for t in targets)
    body = []
    for name in records[0]["layers"]:
        cells = [r["layers"][name] for r in records]
        body.append(f"{name:<32}" + "".join(f"  ε {c['threshold']:<9.4g}{c['measured']:>9.4f}" for c in cells))
    return [f"per-layer ε, and the layer's {kind} there:", header, *body]


def sweep_table(rows: list[dict]) -> list[str]:
    """One row per threshold: MAC reduction, measured speedup, efficiency, distance from dense (or, with many
    streams, frames/s)."""
    columns = [c for c in COLUMNS if rows and c[1] in rows[0]]
    if rows and "calibration" in rows[0]:  # the swept value is each layer's target, not one ε
        columns[0] = (rows[0]["calibration"]["target"], *columns[0][1:])
    widths = [max(len(fmt.format(1.0)), len(name)) for name, _, fmt in columns]
    header = "  ".join(f"{name:>{w}}" for (name, _, _), w in zip(columns, widths))
    body = ["  ".join(f"{fmt.format(row[key]):>{w}}" for (_, key, fmt), w in zip(columns, widths)) for row in rows]
    if rows and "agreement_kind" in rows[0]:
        body.append(f"(err: per-frame relative error of the output vs dense; agree: {rows[0]['agreement_kind']} "
                    "agreement)")
    return [header, *body]


def plot_sweep(rows: list[dict], path: Path, *, title: str = "", gate: str = "input_norm") -> Path:
    """Speedup (in the gate's colour, as in every plot) and MAC reduction against the median per-frame error, one
    point per threshold."""
    from gatesearch.viz.colours import gate_colour
    from gatesearch.viz.plots import pyplot

    plt = pyplot()
    rows = sorted(rows, key=lambda r: r["threshold"])
    err = [r["rel_error_median"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot(err, [r["mac_reduction"] for r in rows], "o--", color="grey", label="MAC reduction")
    ax.plot(err, [r["speedup"] for r in rows], "o-", color=gate_colour(gate), label="measured speedup")
    for r, x in zip(rows, err):
        ax.annotate(f"ε {r['threshold']:g}", (x, r["speedup"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("median per-frame relative error of the output vs dense")
    ax.set_ylabel("× dense")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
