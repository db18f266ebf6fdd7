"""One fidelity run: the shared networks and clips (built once, on first use), the findings in order, the report.

``Context`` is what a finding sees. It takes each shared network from the train-once cache (trained there once),
fine-tunes each (gate, knobs, clip length) once, so findings that need the same model measure the same model
("from the same runs"), and it holds the device lock while anything is timed. Each finished finding and each
fine-tuned model is saved in the report folder (``saved``): the same command with the same ``--out`` continues an
interrupted run, skipping what is there.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .measure import Score, score, side_by_side
from .networks import NetworkSpec, build_dense, convert, trained_dense
from .profiles import Profile
from .progress import Progress, clock
from .registry import FINDINGS, Claim, Finding, FindingSpec, ordered
from .saved import RunFolder


@dataclass(frozen=True, kw_only=True)
class FidelityOptions:
    profile: Profile
    out: Path  # report folder (created; or a run of the same profile, seed and clip to continue)
    workdir: Path = Path("gatesearch_runs")  # its MLflow store gets the run
    tracking_uri: str | None = None  # an MLflow server instead of the work folder's store
    video: Path | None = None  # a real clip to time on (findings about real motion)
    only: tuple[str, ...] = ()  # run these findings (and what they require); empty: all
    command: str = "gatesearch fidelity"  # as typed, for the report header


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A gated model a finding trained or tuned, with its dense twin: what finding 7 times."""

    family: str  # gate family as the report names it
    label: str  # its operating point, e.g. "ε 12.5, b 4"
    spec: NetworkSpec
    dense: nn.Module
    gated: nn.Module
    score: Score  # on the spec's held-out clips
    dense_score: Score


@dataclass
class Context:
    options: FidelityOptions
    progress: Progress
    lock: Any  # objectives.device.DeviceLock
    folder: RunFolder | None = None  # where finished findings and fine-tuned models are saved (None: nowhere)
    candidates: dict[str, Candidate] = field(default_factory=dict)  # family -> the model finding 7 times
    _cache: dict[Any, Any] = field(default_factory=dict)
    # how each gated model handed out was made (what a saved candidate is rebuilt from)
    _recipes: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)

    @property
    def profile(self) -> Profile:
        return self.options.profile

    @property
    def out(self) -> Path:
        return self.options.out

    def step(self, line: str) -> None:
        self.progress.step(line)

    def _once(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- data --------------------------------------------------------------------------------------
    def clips(self, spec: NetworkSpec, *, split: str, frames: int, count: int) -> dict[str, torch.Tensor]:
        from gatesearch.data.source import load_clips

        return self._once(("clips", spec.size, split, frames, count),
                          lambda: load_clips(spec.data(), split=split, frames=frames, count=count))

    def held_out(self, spec: NetworkSpec) -> dict[str, torch.Tensor]:
        return self.clips(spec, split="val", frames=spec.val_frames, count=spec.val_clips)

    def timed_clip(self, spec: NetworkSpec) -> torch.Tensor:
        """(1, T, 3, H, W): the ``--video`` clip resized to the network's frames, else a synthetic test clip."""
        def make() -> torch.Tensor:
            from gatesearch.data import SyntheticConfig, make_clip, read_frames

            frames = self.profile.timing.frames
            if self.options.video is not None:
                return read_frames(self.options.video, max_frames=frames, size=(spec.size, spec.size))[None]
            cfg = SyntheticConfig(height=spec.size, width=spec.size, frames=frames)
            return make_clip(cfg, 0, "test")["clip"][None]

        return self._once(("timed", spec.size), make)

    def clip_source(self) -> str:
        t = self.profile.timing.frames
        video = self.options.video
        return f"`{video.name}` (first {t} frames)" if video else f"a synthetic test clip ({t} frames)"

    # -- networks ----------------------------------------------------------------------------------
    def dense(self, spec: NetworkSpec) -> nn.Module:
        """The trained dense network of ``spec`` (trained once per run). Findings convert copies of it."""
        def make() -> nn.Module:
            got = trained_dense(spec, self.options.workdir)
            model = build_dense(spec)
            model.load_state_dict(got.state)
            if got.trained:
                self.step(f"trained the dense {spec.backbone} once ({spec.epochs} epochs, {clock(got.seconds)}; "
                          f"cached in {got.entry})")
            else:
                self.step(f"the dense {spec.backbone}: trained earlier on these settings, loaded from {got.entry}")
            return model.eval()

        return self._once(("dense", spec), make)

    def baseline(self, spec: NetworkSpec) -> Score:
        """The dense network's score on the held-out clips (a reference frame every ``spec.clip_length``)."""
        return self._once(("baseline", spec), lambda: score(self.dense(spec), spec.task, self.held_out(spec),
                                                             reset_every=spec.clip_length))

    def gated(self, spec: NetworkSpec, gate: str, knobs: dict[str, Any]) -> nn.Module:
        """A fresh copy of the shared network converted by ``gate`` (no training: norm gates)."""
        model = convert(self.dense(spec), gate, knobs, seed=spec.seed).eval()
        self._recipes[model] = {"kind": "gated", "gate": gate, "knobs": dict(knobs)}
        return model

    def finetuned(self, spec: NetworkSpec, gate: str, knobs: dict[str, Any], *, clip_length: int | None = None,
                  epochs: int | None = None) -> nn.Module:
        """The shared network converted by ``gate`` and fine-tuned from it (once per gate, knobs and clip length),
        as the papers fine-tune a trained network: Gumbel gates, D-STEP, VA-RED²."""
        from gatesearch.search.trial import train

        t = clip_length or spec.clip_length
        n = epochs or self.profile.finetune_epochs

        recipe = {"kind": "finetuned", "gate": gate, "knobs": dict(knobs), "clip_length": t, "epochs": n,
                  "lr": self.profile.finetune_lr, "spec": dataclasses.asdict(spec)}
        knob_text = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in knobs.items())

        def make() -> nn.Module:
            start = time.perf_counter()
            model = convert(self.dense(spec), gate, knobs, seed=spec.seed)
            saved = self.folder.load_model(recipe) if self.folder is not None else None
            if saved is not None:  # fine-tuned by an earlier session of this run
                try:
                    model.load_state_dict(saved, strict=True)
                except RuntimeError:  # the gate's code changed since: its parameters differ, fine-tune again
                    model, saved = convert(self.dense(spec), gate, knobs, seed=spec.seed), None
                    self.step(f"fine-tuned {gate} ({knob_text}) saved by an earlier session does not fit this "
                              "version of the gate: fine-tuning it again")
                else:
                    self.step(f"fine-tuned {gate} ({knob_text}, T {t}, {n} epochs): loaded, saved by an earlier "
                              "session")
            if saved is None:
                cfg = spec.trial(gate, knobs, clip_length=t, epochs=n, lr=self.profile.finetune_lr)
                train(model, cfg, self.clips(spec, split="train", frames=t, count=spec.train_clips))
                if self.folder is not None:
                    self.folder.save_model(recipe, model)
                self.step(f"fine-tuned {gate} ({knob_text}, T {t}, {n} epochs) in "
                          f"{clock(time.perf_counter() - start)}")
            self._recipes[model] = recipe
            return model.eval()

        return self._once(("finetuned", spec, gate, tuple(sorted(knobs.items())), t, n), make)

    # -- what finding 7 times, across sessions -------------------------------------------------------
    def candidate_records(self, families: list[str]) -> list[dict[str, Any]]:
        """The candidates of ``families`` as JSON: labels, scores, and the recipe of the gated model."""
        out = []
        for family in families:
            c = self.candidates[family]
            recipe = self._recipes.get(c.gated)
            if recipe is None:  # a model the finding made itself: finding 7 cannot time it after a restart
                continue
            out.append({"family": c.family, "label": c.label, "spec": dataclasses.asdict(c.spec), "recipe": recipe,
                        "score": dataclasses.asdict(c.score), "dense_score": dataclasses.asdict(c.dense_score)})
        return out

    def restore_candidate(self, record: dict[str, Any]) -> None:
        """A candidate saved by an earlier session, its gated model rebuilt (converted, or the saved fine-tuning)."""
        spec = NetworkSpec(**record["spec"])
        r = record["recipe"]
        if r["kind"] == "gated":
            gated = self.gated(spec, r["gate"], r["knobs"])
        else:
            gated = self.finetuned(spec, r["gate"], r["knobs"], clip_length=r["clip_length"], epochs=r["epochs"])

        def as_score(d: dict[str, Any]) -> Score:
            return Score(quality=d["quality"], per_clip=tuple(d["per_clip"]), macs=d["macs"],
                         dense_macs=d["dense_macs"])

        self.candidates[record["family"]] = Candidate(
            family=record["family"], label=record["label"], spec=spec, dense=self.dense(spec), gated=gated,
            score=as_score(record["score"]), dense_score=as_score(record["dense_score"]))

    # -- timing ------------------------------------------------------------------------------------
    def threads(self) -> int:
        return self.profile.timing.threads or len(os.sched_getaffinity(0))

    def time(self, dense: nn.Module, gated: nn.Module, clip: torch.Tensor, *, reset_every: int | None) -> dict:
        """Side-by-side wall-clock of ``gated`` against ``dense`` on ``clip``, holding the device lock."""
        return side_by_side(dense, gated, clip, reset_every=reset_every, repeats=self.profile.timing.repeats,
                            threads=self.threads(), lock=self.lock)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    spec: FindingSpec
    finding: Finding
    seconds: float
    error: str | None = None  # the exception that stopped the finding (its claims then say so)
    session: int = 1  # which session of the run measured it (1: the first)


@dataclass(frozen=True, kw_only=True)
class Report:
    options: FidelityOptions
    outcomes: tuple[Outcome, ...]
    planned: int  # findings the run set out to measure (more than outcomes: the report of a run still going)
    started: str  # local date and time the run (its first session) started
    wall_s: float  # every session's time together
    machine: dict[str, Any]
    mlflow_run_id: str | None = None
    sessions: tuple[dict[str, Any], ...] = ()  # each session: started, wall_s, findings measured, commit


def failed(spec: FindingSpec, error: BaseException) -> Finding:
    """What a finding that raised reports: not reproduced, with the error as our number."""
    line = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    claim = Claim(statement=spec.title, paper=spec.source, ours=f"failed: {line}", reproduced=False,
                  rule="the experiment did not finish")
    return Finding(claims=(claim,), numbers={}, setup="", details="")


def machine() -> dict[str, Any]:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "python": platform.python_version()}


def check_options(options: FidelityOptions) -> RunFolder | None:
    """Refuse bad input before anything runs (one line each): an unreadable clip, a report folder holding other
    files or a run of another profile, seed or clip. Returns the run to continue (None: a new run)."""
    from gatesearch.data import read_frames

    from .saved import identity, open_folder

    if options.video is not None:
        read_frames(options.video, max_frames=2, size=(32, 32))  # VideoDecodeError names the file
    return open_folder(options.out, identity(options.profile, options.video))


def saved_outcomes(folder: RunFolder) -> dict[str, tuple[Outcome, list[dict[str, Any]]]]:
    """Findings an earlier session finished, with the candidates they left for finding 7 (unknown keys: left out)."""
    from .saved import finding_from_dict

    out = {}
    for key, data in folder.results().items():
        if key not in FINDINGS:
            continue
        outcome = Outcome(spec=FINDINGS.get(key), finding=finding_from_dict(data["finding"]), seconds=data["seconds"],
                          error=data["error"], session=data.get("session", 1))
        out[key] = (outcome, data.get("candidates", []))
    return out


def run_fidelity(options: FidelityOptions, *, echo: Callable[[str], None] = print, live: bool = False) -> Report:
    """Run the findings of ``options.profile`` (or ``options.only``), write the report, log it to MLflow.
    A report folder of the same run continues it: findings finished there are not run again, and the report is
    rebuilt from all of them. ``live``: also redraw a status line in place (rich; on a terminal)."""
    from gatesearch.objectives.device import DeviceLock, torch_threads

    from . import report as report_mod
    from .saved import commit, identity, new_folder

    folder = check_options(options)
    if folder is None:
        folder = new_folder(options.out, identity(options.profile, options.video), options.command)
    earlier = saved_outcomes(folder)
    done = {k: v for k, v in earlier.items() if v[0].error is None}  # a finding that failed runs again
    specs = ordered(list(options.only) or None)
    todo = [s for s in specs if s.key not in done]
    # what the run set out to measure, over its sessions (a later --only does not shrink it)
    keys = {s.key for s in specs} | set(done) | {k for k in folder.record.get("planned", []) if k in FINDINGS}
    folder.record["planned"] = sorted(keys)
    estimates = {s.key: options.profile.estimate_s.get(s.key, 60.0) for s in todo}
    session = len(folder.sessions) + 1
    started = time.strftime("%Y-%m-%d %H:%M")
    folder.sessions.append({"started": started, "wall_s": 0.0, "commit": commit(), "measured": []})
    folder.save_record()
    if done:
        echo(f"continuing the run in {options.out} (session {session}): "
             f"{', '.join(k for k in sorted(done, key=lambda k: FINDINGS.get(k).number))} finished earlier, "
             "not run again")
    for key, (outcome, _) in earlier.items():
        if outcome.error is not None and key in {s.key for s in todo}:
            echo(f"{key} failed in session {outcome.session} ({outcome.error}); running it again")
    echo(f"fidelity ({options.profile.name}): {len(todo)} findings to run, about {clock(sum(estimates.values()))} "
         f"on 2 quiet cores; report in {options.out} (each finding is saved when it finishes: if the run stops, "
         f"the same command with --out {options.out} continues it)")
    progress = Progress(estimates, echo, live=live)
    lock = DeviceLock()
    ctx = Context(options=options, progress=progress, lock=lock, folder=folder)
    outcomes = {k: v[0] for k, v in done.items()}
    first_started = folder.sessions[0]["started"]

    def report_now() -> Report:
        folder.sessions[-1]["wall_s"] = progress.elapsed()
        folder.save_record()
        return Report(options=options, outcomes=tuple(sorted(outcomes.values(), key=lambda o: o.spec.number)),
                      planned=len(keys), started=first_started, wall_s=sum(x["wall_s"] for x in folder.sessions),
                      machine=machine(), sessions=tuple(folder.sessions))

    try:
        with torch_threads(options.profile.work_threads):
            if todo:
                for key, (_, records) in done.items():  # the gated models later findings time
                    if any(key in s.requires for s in todo):
                        for record in records:
                            ctx.restore_candidate(record)
            for spec in todo:
                progress.begin(spec.key, f"{spec.number}. {spec.title} ({spec.source})")
                start, error = time.perf_counter(), None
                before = {f: c.gated for f, c in ctx.candidates.items()}
                try:
                    finding = spec.run(ctx)
                except Exception as e:  # the report says which finding failed and why; the others still run
                    (options.out / f"{spec.key}.error.txt").write_text(traceback.format_exc())
                    finding, error = failed(spec, e), f"{type(e).__name__}: {e}"
                seconds = time.perf_counter() - start
                outcomes[spec.key] = Outcome(spec=spec, finding=finding, seconds=seconds, error=error, session=session)
                added = [f for f, c in ctx.candidates.items() if before.get(f) is not c.gated]
                folder.save_result(spec.key, seconds=seconds, error=error, finding=finding,
                                   candidates=ctx.candidate_records(added))
                folder.sessions[-1]["measured"].append(spec.key)
                verdicts = ", ".join(c.verdict for c in finding.claims)
                progress.end(spec.key, f"{spec.key}: {verdicts}")
                # the report so far, so that a run stopped midway leaves what it measured
                report_mod.write(report_now())
    except KeyboardInterrupt:
        report_mod.write(report_now())
        echo(f"stopped: {len(outcomes)} of {len(keys)} findings saved in {options.out}; the same command with "
             f"--out {options.out} continues the run")
        raise
    finally:
        lock.close()
        progress.stop()
    report = report_now()
    report_mod.write(report)
    run_id = report_mod.log_mlflow(report)
    return dataclasses.replace(report, mlflow_run_id=run_id)


__all__ = ["Candidate", "Context", "FidelityOptions", "Outcome", "Report", "check_options", "run_fidelity"]
