"""The fidelity report: ``report.md`` (one table line per claim, then each finding's setup, measurements and
plots), ``report.json`` (every number), and one MLflow run holding both, the plots, metrics and verdict tags."""

from __future__ import annotations

import json
from typing import Any

from .progress import clock
from .registry import NOT_REPRODUCED, REPRODUCED
from .saved import MODELS

EXPERIMENT = "gatesearch-fidelity"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sessions(report) -> str:
    """How an interrupted run was continued: each session's start and time (empty for a run done in one go)."""
    if len(report.sessions) < 2:
        return ""
    parts = [f"{x['started']} for {clock(x['wall_s'])}" for x in report.sessions]
    return f" over {len(report.sessions)} sessions ({'; '.join(parts)})"


def markdown(report) -> str:
    o = report.options
    m = report.machine
    claims = [(out, c) for out in report.outcomes for c in out.finding.claims]
    held = sum(c.reproduced for _, c in claims)
    lines = [
        "# gatesearch fidelity report",
        "",
        f"`{o.command}` — profile **{o.profile.name}**, started {report.started}, took {clock(report.wall_s)}"
        f"{_sessions(report)}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}; trainings and quality "
        f"measurements on {o.profile.work_threads} torch thread{'s' if o.profile.work_threads > 1 else ''}, timings "
        f"on {o.profile.timing.threads or m['cores']}.",
        f"Seed {o.profile.seed} for every training, gate initialisation and data order; the synthetic clips are fixed "
        "by their index. Sizes are under each finding; the whole profile is in `report.json`.",
        "",
        f"**{held} of {len(claims)} claims reproduced.** A claim that does not hold is listed as such: this report "
        "is a measurement, not a test.",
        *([] if len(report.outcomes) == report.planned else
          ["", f"**Incomplete: {len(report.outcomes)} of {report.planned} findings so far** (the run is still going, "
               "or was stopped)."]),
        "",
        "| # | finding | paper | ours | verdict |",
        "|---|---------|-------|------|---------|",
    ]
    for out, c in claims:
        verdict = f"**{REPRODUCED}**" if c.reproduced else f"**{NOT_REPRODUCED}**"
        lines.append(f"| {out.spec.number} | {_cell(c.statement)} | {_cell(c.paper)} | {_cell(c.ours)} | {verdict} |")
    for out in report.outcomes:
        s, f = out.spec, out.finding
        session = f" (session {out.session})" if len(report.sessions) > 1 else ""
        lines += ["", f"## {s.number}. {s.title}", "", f"*{s.source}* — {clock(out.seconds)}{session}.", ""]
        if out.error:
            lines += [f"The experiment failed: `{_cell(out.error)}` (traceback in `{s.key}.error.txt`).", ""]
        if f.setup:
            lines += [f"Setup: {f.setup}.", ""]
        lines += [f"- {c.verdict}: {c.statement} — rule: {c.rule}." for c in f.claims]
        if f.details:
            lines += ["", f.details]
        for plot in f.plots:
            lines += ["", f"![{s.key}]({plot})"]
    return "\n".join(lines) + "\n"


def as_json(report) -> dict[str, Any]:
    o = report.options
    return {
        "command": o.command,
        "profile": o.profile.to_dict(),
        "started": report.started,
        "complete": len(report.outcomes) == report.planned,
        "wall_s": report.wall_s,
        "sessions": list(report.sessions),
        "machine": report.machine,
        "video": str(o.video) if o.video else None,
        "findings": [
            {"number": out.spec.number, "key": out.spec.key, "title": out.spec.title, "source": out.spec.source,
             "seconds": out.seconds, "session": out.session, "error": out.error, "setup": out.finding.setup,
             "claims": [{"statement": c.statement, "paper": c.paper, "ours": c.ours, "verdict": c.verdict,
                         "rule": c.rule} for c in out.finding.claims],
             "numbers": out.finding.numbers, "plots": list(out.finding.plots)}
            for out in report.outcomes
        ],
    }


def write(report) -> None:
    from .saved import write_atomic

    out = report.options.out
    write_atomic(out / "report.md", markdown(report))
    write_atomic(out / "report.json", json.dumps(as_json(report), indent=2, default=str))


def log_mlflow(report) -> str:
    """One run in the work folder's store (or ``tracking_uri``): params = the profile, metrics = every finite number
    (``<finding>.<name>``), tags = verdicts, artifacts = the report folder. Returns the run id."""
    import math

    from gatesearch.search.engine import set_env_defaults
    from gatesearch.search.tracking import Tracker, _flatten, default_tracking_uri

    set_env_defaults()
    o = report.options
    tracker = Tracker(o.tracking_uri or default_tracking_uri(o.workdir))
    exp_id = tracker.experiment(EXPERIMENT, o.workdir / "mlartifacts")
    tags = {"gatesearch.kind": "fidelity", "gatesearch.profile": o.profile.name}
    tags.update({f"verdict.{out.spec.key}": "; ".join(c.verdict for c in out.finding.claims)
                 for out in report.outcomes})
    run = tracker.client.create_run(exp_id, run_name=f"fidelity-{o.profile.name}-{report.started.replace(' ', 'T')}",
                                    tags=tags)
    rid = run.info.run_id
    metrics = {f"{out.spec.key}.{name}": value for out in report.outcomes
               for name, value in out.finding.numbers.items() if math.isfinite(value)}
    metrics.update({f"{out.spec.key}.reproduced": float(all(c.reproduced for c in out.finding.claims))
                    for out in report.outcomes})
    metrics.update(claims_reproduced=sum(c.reproduced for out in report.outcomes for c in out.finding.claims),
                   wall_s=report.wall_s)
    try:
        tracker._log_params(rid, _flatten({"profile": o.profile.to_dict(), "video": str(o.video or "")}))
        tracker.log_metrics(rid, metrics, step=0)
        for path in sorted(o.out.iterdir()):  # the fine-tuned models stay in the folder (megabytes each)
            if path.name.startswith(".") or path.name == MODELS:
                continue
            if path.is_dir():
                tracker.client.log_artifacts(rid, str(path), f"report/{path.name}")
            else:
                tracker.client.log_artifact(rid, str(path), "report")
    except BaseException:
        tracker.client.set_terminated(rid, status="FAILED")
        raise
    tracker.client.set_terminated(rid, status="FINISHED")
    return rid


__all__ = ["EXPERIMENT", "as_json", "log_mlflow", "markdown", "write"]
