"""Early stopping by dominance: a Ray Tune scheduler that stops a trial at a rung when it is dominated.

Optuna cannot prune a multi-objective study and Ray Tune's schedulers rank one metric, so the rule is Syne Tune's
MOASHA (Schmucker et al., "Multi-objective multi-fidelity hyperparameter optimization with application to
fairness"): rungs sit at epochs grace_period·η^k; a trial reaching a rung is placed among every trial that reached
it before, all sorted into non-dominated fronts, and it goes on only when at most a fraction 1/η of them lie in
better fronts than its own. MOASHA breaks ties inside a front by an ε-net; here a whole front ranks alike, so a
trial that no other trial at its rung dominates is never stopped. The first trial at a rung always goes on.

Trials report per epoch the two objectives as measured cheaply during training (quality on a few held-out clips,
effective MACs from the gates' densities); the measured latency comes only at the end.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from .pareto import nondominated_fronts


@dataclass(frozen=True)
class Objective:
    key: str  # metric of the per-epoch report
    mode: str  # "max" or "min"

    def loss(self, value: float) -> float:
        """The value as a loss (smaller is better)."""
        return -value if self.mode == "max" else value


#: what a trial reports each epoch while training (``search.probe``): the rungs rank these
EPOCH_OBJECTIVES = (Objective("epoch_quality", "max"), Objective("epoch_macs", "min"))
EPOCH = "epoch"  # the per-epoch report's epoch (1-based)
EPOCHS = "epochs"  # the trial's last epoch (a rung at or past it is not applied)


class Rungs:
    """The rungs' records, without Ray: which trials reached which rung with which objectives, and the verdict."""

    def __init__(self, milestones: Sequence[int], *, reduction_factor: float,
                 objectives: Sequence[Objective] = EPOCH_OBJECTIVES) -> None:
        self.reduction_factor = reduction_factor
        self.objectives = tuple(objectives)
        self.recorded: dict[int, dict[str, tuple[float, ...]]] = {int(m): {} for m in milestones}
        self.stopped: dict[str, int] = {}  # trial id -> epoch of the rung that stopped it

    def decide(self, trial_id: str, result: dict) -> bool:
        """Record ``result`` if it is a rung's report for this trial; True when the trial should stop there."""
        epoch = result.get(EPOCH)
        rung = self.recorded.get(epoch) if isinstance(epoch, int) else None
        if rung is None or trial_id in rung:
            return False
        last = result.get(EPOCHS)
        if isinstance(last, int) and epoch >= last:
            return False  # its last epoch: only the final evaluation is left to save
        losses = tuple(o.loss(float(result[o.key])) for o in self.objectives)
        earlier = list(rung.values())
        rung[trial_id] = losses
        if not earlier:
            return False
        stop = self.dominated_share(earlier, losses) > 1.0 / self.reduction_factor
        if stop:
            self.stopped[trial_id] = epoch
        return stop

    @staticmethod
    def dominated_share(earlier: list[tuple[float, ...]], new: tuple[float, ...]) -> float:
        """The fraction of the rung's trials (``earlier`` and the new one) in fronts better than the new one's."""
        points = [*earlier, new]
        front_of = {}
        for rank, front in enumerate(nondominated_fronts(points)):
            front_of.update(dict.fromkeys(front, rank))
        ranks = sorted(front_of[i] for i in range(len(points)))
        return bisect.bisect_left(ranks, front_of[len(points) - 1]) / len(points)


def dominance_scheduler(rungs: Rungs):
    """The Ray Tune scheduler (FIFO order) that stops the trials ``rungs`` says to stop."""
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class DominanceScheduler(FIFOScheduler):
        _supports_buffered_results = False  # decide on each epoch's report as it comes

        def __init__(self) -> None:
            super().__init__()
            self.rungs = rungs

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True  # the objectives are the rungs' own

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            return TrialScheduler.STOP if self.rungs.decide(trial.trial_id, result) else TrialScheduler.CONTINUE

        def debug_string(self) -> str:
            seen = {m: len(r) for m, r in self.rungs.recorded.items()}
            return f"dominance stopping: trials per rung {seen}, stopped {len(self.rungs.stopped)}"

    return DominanceScheduler()


__all__ = ["EPOCH", "EPOCHS", "EPOCH_OBJECTIVES", "Objective", "Rungs", "dominance_scheduler"]
