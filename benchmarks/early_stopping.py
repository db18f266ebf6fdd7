"""Early stopping by dominance: the same search with and without it, on the same budget of trials.

    python benchmarks/early_stopping.py [--trials 16] [--epochs 8] [--seeds 0 1] [--objective macs]
                                        [--reduction-factor 3] [--grace-period 2] [--workdir /tmp/es-bench]
                                        [--plot docs/early_stopping.png] [--json]

Both runs are one ``gatesearch search`` (Ray Tune + Optuna + MLflow, ``run_search``) of the Skip-Conv norm gates
(input and output norm, threshold and block size sampled, learning rate sampled) trained for ``--epochs`` epochs on
the synthetic task at 32², same seed, same number of trials;
the second adds ``early_stopping: {kind: dominance, ...}``. Each run is read back from its Optuna study: a
completed trial cost its epochs, a pruned one the epochs up to the rung that stopped it. The hypervolume of the
completed trials' front is taken after each trial against one reference for both runs (quality 0, the dense
network's cost), and plotted against the training epochs spent and against wall time.

The goal (issue 17): with early stopping, ≥ 95 % of the hypervolume the full search reaches, for ≤ 60 % of its
training epochs. Training epochs are the compute measure that does not depend on what else runs on the machine.
Besides the final figures, the curves say at what share of the full search's epochs each run first reaches 95 % of
the full search's final hypervolume. With several ``--seeds`` each pair runs per seed, and every figure is per seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def search_config(args, *, early: bool):
    from gatesearch.spaces import parse_search_config

    raw = {
        "name": f"es-bench-{'dominance' if early else 'full'}",
        "trials": args.trials,
        "max_concurrent": args.max_concurrent,
        "seed": args.seed,
        "objective": args.objective,
        "sampler": "tpe",
        "model": {"from_scratch": True},  # every trial trains from random weights for space.epochs
        "data": {"train_clips": args.train_clips, "val_clips": args.val_clips,
                 "synthetic": {"height": 32, "width": 32}},
        "evaluation": {"frames": 8, "latency_warmup": 1, "latency_repeats": 3},
        "space": {"backbone": "tiny", "gate": ["input_norm", "output_norm"], "clip_length": 2, "epochs": args.epochs,
                  "lr": {"low": 0.001, "high": 0.03, "log": True}, "block_size": [1, 2, 4],
                  "gates": {"input_norm": {"threshold": {"low": 0.1, "high": 30.0, "log": True}},
                            "output_norm": {"threshold": {"low": 10.0, "high": 3000.0, "log": True}}}},
    }
    if early:
        raw["early_stopping"] = {"kind": "dominance", "grace_period": args.grace_period,
                                 "reduction_factor": args.reduction_factor, "probe_clips": args.probe_clips}
    return parse_search_config(raw)


def read_run(summary: dict, epochs: int) -> list[dict]:
    """The trials of a finished search in the order they ended: epochs spent, wall time, final objectives."""
    import optuna

    study = optuna.load_study(study_name=summary["search_id"], storage=summary["optuna_storage"])
    done = [t for t in study.trials if t.datetime_complete is not None]
    start = min(t.datetime_start for t in done)
    out = []
    for t in sorted(done, key=lambda t: t.datetime_complete):
        state = t.state.name
        spent = t.user_attrs.get("stopped_at_epoch", epochs) if state != "FAIL" else 0
        out.append({"state": state, "epochs": spent, "wall_s": (t.datetime_complete - start).total_seconds(),
                    "values": list(t.values) if t.values else None})
    return out


def curve(trials: list[dict], reference) -> list[dict]:
    """Hypervolume after each trial against cumulative epochs and wall time."""
    from gatesearch.search.hypervolume import hypervolume

    points, spent, out = [], 0, []
    for t in trials:
        spent += t["epochs"]
        if t["state"] == "COMPLETE":
            points.append(tuple(t["values"]))
        out.append({"epochs": spent, "wall_s": t["wall_s"], "hypervolume": hypervolume(points, reference)})
    return out


def share_to_reach(c: list[dict], target: float, total_epochs: int) -> float | None:
    """The share of ``total_epochs`` spent when the curve first reaches ``target`` (None: never)."""
    return next((p["epochs"] / total_epochs for p in c if p["hypervolume"] >= target), None)


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120, sharey=True)
    for label, c in curves.items():
        for ax, x in zip(axes, ("epochs", "wall_s")):
            ax.step([0] + [p[x] for p in c], [0] + [p["hypervolume"] for p in c], where="post", label=label)
    axes[0].set_xlabel("training epochs spent (all trials)")
    axes[1].set_xlabel("wall time (s)")
    axes[0].set_ylabel("hypervolume of the front")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def compare(args, seed: int) -> dict:
    """One seed: the full search, then the same with early stopping; their curves and the goal's figures."""
    from gatesearch.search.engine import RunOptions, run_search
    from gatesearch.search.hypervolume import Reference

    args = argparse.Namespace(**{**vars(args), "seed": seed})
    runs, summaries = {}, {}
    for label, early in (("full", False), ("dominance", True)):
        summaries[label] = run_search(search_config(args, early=early), RunOptions(workdir=args.workdir),
                                      echo=lambda line: print(line, file=sys.stderr))
        runs[label] = read_run(summaries[label], args.epochs)
    dense = [s["hypervolume_reference"]["cost"] for s in summaries.values() if s.get("hypervolume_reference")]
    reference = Reference(0.0, max(dense))
    curves = {label: curve(trials, reference) for label, trials in runs.items()}
    full, early = curves["full"][-1], curves["dominance"][-1]
    result = {
        "seed": seed, "reference": dataclasses.asdict(reference),
        "trials": args.trials, "epochs_per_trial": args.epochs,
        "full": {"epochs": full["epochs"], "wall_s": full["wall_s"], "hypervolume": full["hypervolume"]},
        "dominance": {"epochs": early["epochs"], "wall_s": early["wall_s"], "hypervolume": early["hypervolume"],
                      "pruned": sum(t["state"] == "PRUNED" for t in runs["dominance"])},
        "epochs_ratio": early["epochs"] / full["epochs"],
        "hypervolume_ratio": early["hypervolume"] / full["hypervolume"] if full["hypervolume"] else None,
        "share_to_95": {k: share_to_reach(c, 0.95 * full["hypervolume"], full["epochs"]) for k, c in curves.items()},
        "curves": curves,
    }
    result["goal_met"] = bool(result["hypervolume_ratio"] is not None and result["hypervolume_ratio"] >= 0.95
                              and result["epochs_ratio"] <= 0.60)
    if args.plot:
        path = args.plot if len(args.seeds) == 1 else args.plot.with_stem(f"{args.plot.stem}-seed{seed}")
        plot({f"{k} ({v[-1]['epochs']} epochs)": v for k, v in curves.items()}, path)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-clips", type=int, default=256)
    p.add_argument("--val-clips", type=int, default=48)
    p.add_argument("--probe-clips", type=int, default=24, help="held-out clips the rungs rank quality on")
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--objective", choices=["macs", "latency"], default="macs")
    p.add_argument("--grace-period", type=int, default=2)
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gatesearch-es-bench"))
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    results = [compare(args, seed) for seed in args.seeds]
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        full, early = r["full"], r["dominance"]
        print(f"seed {r['seed']}: full search    {full['epochs']:4d} epochs, {full['wall_s']:6.0f} s, hypervolume "
              f"{full['hypervolume']:.4g}")
        print(f"seed {r['seed']}: early stopping {early['epochs']:4d} epochs, {early['wall_s']:6.0f} s, hypervolume "
              f"{early['hypervolume']:.4g} ({early['pruned']} trials stopped)")
        reach = {k: "never" if v is None else f"{v:.2f}" for k, v in r["share_to_95"].items()}
        print(f"seed {r['seed']}: compute ratio {r['epochs_ratio']:.2f}, hypervolume ratio "
              f"{r['hypervolume_ratio']:.3f} -> goal (>= 0.95 for <= 0.60) {'met' if r['goal_met'] else 'NOT met'}; "
              f"95 % of the full final hypervolume reached at {reach['full']} (full) / {reach['dominance']} "
              f"(early stopping) of the full search's epochs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
