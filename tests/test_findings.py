"""``gatesearch fidelity``: the papers' findings re-run, reported line by line (gatesearch.findings).

The slow test runs ``gatesearch fidelity --quick`` end to end (what issue 20 asks of CI) and checks that the
report is complete (every finding has claims with numbers and a verdict, the plots exist, one MLflow run holds it),
not that every verdict is "reproduced": the report is a measurement.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from gatesearch.findings import FINDINGS, Claim, Finding, register_finding
from gatesearch.findings.measure import front, mean_quality
from gatesearch.findings.networks import NetworkSpec
from gatesearch.findings.registry import NOT_REPRODUCED, REPRODUCED, ordered

ISSUE_FINDINGS = {1: "keep_all", 2: "gate_fronts", 3: "block_size", 4: "clip_length", 5: "dstep_target",
                  6: "vared2_space", 7: "wallclock"}


def test_every_finding_of_the_issue_is_registered_once_in_order():
    assert {s.number: s.key for s in ordered()} == ISSUE_FINDINGS


def test_a_finding_brings_the_findings_it_times():
    assert [s.key for s in ordered(["wallclock"])] == ["gate_fronts", "dstep_target", "vared2_space", "wallclock"]
    assert [s.key for s in ordered(["keep_all"])] == ["keep_all"]


def test_front_and_area_under_it():
    pts = [(0.5, 0.6), (0.5, 0.7), (0.8, 0.65), (1.0, 0.9)]
    assert front(pts) == [(0.5, 0.7), (1.0, 0.9)]  # (0.8, 0.65) is dominated by (0.5, 0.7)
    # budgets 0.5..1: best within budget is 0.7 until 1.0
    assert math.isclose(mean_quality(pts, 0.5, 1.0), 0.7)
    better = [(0.5, 0.8), (1.0, 0.9)]
    assert mean_quality(better, 0.5, 1.0) > mean_quality(pts, 0.5, 1.0)


def test_unknown_finding_and_used_out_folder_are_one_line_errors(cli, tmp_path):
    result = cli("fidelity", "--only", "nope")
    assert result.exit_code != 0 and "nope" in result.output and "keep_all" in result.output
    used = tmp_path / "used"
    used.mkdir()
    (used / "report.md").write_text("old")
    result = cli("fidelity", "--profile", "smoke", "--only", "keep_all", "--out", str(used))
    assert result.exit_code != 0 and "neither empty nor a fidelity run" in result.output
    assert (used / "report.md").read_text() == "old"
    bad = tmp_path / "not_a_video.mp4"
    bad.write_text("text")
    result = cli("fidelity", "--profile", "smoke", "--video", str(bad), "--out", str(tmp_path / "new"))
    assert result.exit_code != 0 and "not_a_video.mp4" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_a_failing_finding_is_reported_not_reproduced(tmp_path, monkeypatch):
    """One finding raising does not stop the report; it says which and why, with a not-reproduced verdict."""
    from gatesearch.findings import FidelityOptions, get_profile, run_fidelity

    @register_finding("broken_for_test", number=99, title="a finding that raises", source="none")
    def broken(ctx) -> Finding:
        raise RuntimeError("no data here")

    @register_finding("fine_for_test", number=98, title="a finding that holds", source="none")
    def fine(ctx) -> Finding:
        return Finding(claims=(Claim(statement="1 = 1", paper="1", ours="1", reproduced=True),), numbers={"one": 1.0},
                       setup="nothing")

    try:
        out = tmp_path / "report"
        options = FidelityOptions(profile=get_profile("smoke"), out=out, workdir=tmp_path,
                                  only=("fine_for_test", "broken_for_test"))
        report = run_fidelity(options, echo=lambda line: None)
    finally:
        FINDINGS.unregister("broken_for_test")
        FINDINGS.unregister("fine_for_test")
    verdicts = [c.verdict for o in report.outcomes for c in o.finding.claims]
    assert verdicts == [REPRODUCED, NOT_REPRODUCED]
    text = (out / "report.md").read_text()
    assert "failed: RuntimeError: no data here" in text and "**1 of 2 claims reproduced.**" in text
    assert (out / "broken_for_test.error.txt").exists()
    assert report.mlflow_run_id


@pytest.mark.slow
def test_fidelity_command_writes_a_complete_report(cli, tmp_path):
    """``gatesearch fidelity --quick`` (about 7 minutes on 2 cores): a verdict and numbers for every claim of every
    finding, the plots, the JSON and one finished MLflow run holding them."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "report"
    result = cli("fidelity", "--quick", "--out", str(out), "--workdir", str(tmp_path / "wd"))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert [f["key"] for f in data["findings"]] == list(ISSUE_FINDINGS.values())
    assert data["profile"]["name"] == "quick" and "seed" in data["profile"]
    md = (out / "report.md").read_text()
    for f in data["findings"]:
        assert f["claims"], f["key"]
        for c in f["claims"]:
            assert c["verdict"] in (REPRODUCED, NOT_REPRODUCED)
            assert c["paper"] and c["ours"]
            assert f"| {f['number']} | " in md
        if f["error"] is None:  # a finding that ran measured numbers; one that failed says so in `ours`
            assert f["numbers"], f["key"]
        for plot in f["plots"]:
            assert (out / plot).stat().st_size > 0 and f"]({plot})" in md
    assert sum(1 for f in data["findings"] if f["plots"]) >= 5
    claims = sum(len(f["claims"]) for f in data["findings"])
    assert md.count(f"**{REPRODUCED}**") + md.count(f"**{NOT_REPRODUCED}**") == claims
    run_id = result.output.strip().rsplit("MLflow run ", 1)[1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["gatesearch.kind"] == "fidelity"
    assert {a.path for a in client.list_artifacts(run_id, "report")} >= {"report/report.md", "report/report.json"}
    assert "dense" in {p.name for p in (tmp_path / "wd").iterdir()}  # the networks are in the train-once cache

    # the same command again: every finding is saved, none runs again, the report is rebuilt from what was saved
    again = cli("fidelity", "--quick", "--out", str(out), "--workdir", str(tmp_path / "wd"))
    assert again.exit_code == 0, again.output
    assert "not run again" in again.output and "0 findings to run" in again.output
    rebuilt = json.loads((out / "report.json").read_text())
    assert [f["claims"] for f in rebuilt["findings"]] == [f["claims"] for f in data["findings"]]
    assert len(rebuilt["sessions"]) == 2 and rebuilt["complete"]


TINY = NetworkSpec(backbone="tiny", task="classification", size=32, train_clips=4, epochs=1, clip_length=2,
                   val_clips=2, val_frames=4)


def tiny_profile():
    from gatesearch.findings import get_profile

    return dataclasses.replace(get_profile("smoke"), frame_net=TINY, clip_net=TINY)


def test_findings_train_the_dense_network_once_in_the_search_cache(tmp_path):
    """The findings' dense network comes from the search's train-once cache: trained and stored on first use,
    loaded by the next run, under the key a search on the same settings computes (issue 15)."""
    from gatesearch.findings.networks import trained_dense
    from gatesearch.search.dense import plan
    from gatesearch.spaces import parse_search_config

    first = trained_dense(TINY, tmp_path)
    assert first.trained and (first.entry / "model.safetensors").exists() and first.entry.parent == tmp_path / "dense"
    again = trained_dense(TINY, tmp_path)
    assert not again.trained and again.key == first.key
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)
    search = parse_search_config({
        "seed": TINY.seed,
        "model": {"train": {"epochs": TINY.epochs, "lr": TINY.lr, "clip_length": TINY.clip_length}},
        "data": {"train_clips": TINY.train_clips, "val_clips": 7, "synthetic": {"height": 32, "width": 32}},
        "space": {"backbone": "tiny", "gate": "input_norm", "task": "classification"}})
    assert [p.cache_key for p in plan(search)] == [first.key]
    other = trained_dense(dataclasses.replace(TINY, seed=1), tmp_path)
    assert other.trained and other.key != first.key


def counting_findings(calls, *, interrupt):
    """Three test findings: one that holds, one that fine-tunes a Gumbel gate and leaves it for the third to use
    (as findings 2, 5, 6 leave models for 7), which is interrupted when ``interrupt`` says so."""
    from gatesearch.findings.measure import score
    from gatesearch.findings.runner import Candidate

    def one(ctx) -> Finding:
        calls.append("one")
        return Finding(claims=(Claim(statement="1 = 1", paper="1", ours="1", reproduced=True),),
                       numbers={"one": 1.0}, setup="nothing")

    def tuned(ctx) -> Finding:
        calls.append("tuned")
        spec = ctx.profile.frame_net
        model = ctx.finetuned(spec, "gumbel", {"beta": 3.0, "block_size": 1})
        s = score(model, spec.task, ctx.held_out(spec), reset_every=spec.clip_length)
        ctx.candidates["gumbel"] = Candidate(family="gumbel", label="β 3", spec=spec, dense=ctx.dense(spec),
                                             gated=model, score=s, dense_score=ctx.baseline(spec))
        return Finding(claims=(Claim(statement="tuned", paper="-", ours=f"{s.quality:.3f}", reproduced=True),),
                       numbers={"quality": s.quality}, setup="gumbel")

    def uses(ctx) -> Finding:
        calls.append("uses")
        if interrupt():
            raise KeyboardInterrupt
        c = ctx.candidates["gumbel"]
        clip = ctx.held_out(c.spec)["clip"][:1]
        out = c.gated.stream(clip, reset_every=c.spec.clip_length)
        (ctx.out / "uses.safetensors").unlink(missing_ok=True)
        save_file({"out": out.contiguous()}, str(ctx.out / "uses.safetensors"))
        return Finding(claims=(Claim(statement="used", paper="-", ours=c.label, reproduced=True),),
                       numbers={"sum": float(out.sum())}, setup="timed")

    register_finding("one_for_test", number=97, title="holds", source="none")(one)
    register_finding("tuned_for_test", number=98, title="fine-tunes", source="none")(tuned)
    register_finding("uses_for_test", number=99, title="uses the fine-tuned model", source="none",
                     requires=("tuned_for_test",))(uses)
    return ("one_for_test", "tuned_for_test", "uses_for_test")


def test_an_interrupted_run_continues_where_it_stopped(tmp_path):
    """Ctrl-C in the third finding: the first two are saved (results and the fine-tuned model); the same run again
    skips them, rebuilds the model the third finding needs from what was saved (no second fine-tuning) and
    writes the whole report; another seed on the same folder is refused in one line."""
    from gatesearch.findings import FidelityOptions, run_fidelity
    from gatesearch.findings.saved import RunFolderError

    calls, lines, stop = [], [], [True]
    keys = counting_findings(calls, interrupt=lambda: stop[0])
    out = tmp_path / "report"
    options = FidelityOptions(profile=tiny_profile(), out=out, workdir=tmp_path, only=("uses_for_test", "one_for_test"))
    try:
        with pytest.raises(KeyboardInterrupt):
            run_fidelity(options, echo=lines.append)
        assert calls == ["one", "tuned", "uses"]
        assert sorted(p.name for p in (out / "results").iterdir()) == ["one_for_test.json", "tuned_for_test.json"]
        assert len(list((out / "models").glob("*.safetensors"))) == 1
        assert "Incomplete: 2 of 3 findings" in (out / "report.md").read_text()
        assert "continues the run" in lines[-1]

        stop[0] = False
        lines.clear()
        report = run_fidelity(options, echo=lines.append)
        assert calls == ["one", "tuned", "uses", "uses"]  # the finished findings were not run again
        assert any("finished earlier, not run again" in line for line in lines)
        assert any("loaded, saved by an earlier session" in line for line in lines)
        assert not any("fine-tuned gumbel (beta 3, block_size 1, T 2, 1 epochs) in" in line for line in lines)
        assert [o.spec.key for o in report.outcomes] == list(keys)
        assert [o.session for o in report.outcomes] == [1, 1, 2]
        text = (out / "report.md").read_text()
        assert "**3 of 3 claims reproduced.**" in text and "over 2 sessions" in text and "Incomplete" not in text
        data = json.loads((out / "report.json").read_text())
        assert data["complete"] and len(data["sessions"]) == 2

        # the restored model is the fine-tuned one: a fresh run of the same findings gives the same output
        calls.clear()
        fresh = FidelityOptions(profile=tiny_profile(), out=tmp_path / "fresh", workdir=tmp_path,
                                only=("uses_for_test",))
        run_fidelity(fresh, echo=lambda line: None)
        assert torch.equal(load_file(str(out / "uses.safetensors"))["out"],
                           load_file(str(tmp_path / "fresh" / "uses.safetensors"))["out"])

        # a saved fine-tuning that no longer fits the gate (its code changed between sessions) is redone
        (saved,) = (out / "models").glob("*.safetensors")
        save_file({"not_a_parameter": torch.zeros(1)}, str(saved))
        (out / "results" / "uses_for_test.json").unlink()
        (out / "results" / "tuned_for_test.json").unlink()
        lines.clear()
        run_fidelity(options, echo=lines.append)
        assert any("does not fit this version of the gate" in line for line in lines)
        assert load_file(str(saved)).keys() != {"not_a_parameter"}  # saved again, whole

        before = (out / "report.md").read_text()
        other = dataclasses.replace(options, profile=dataclasses.replace(tiny_profile(), seed=1))
        with pytest.raises(RunFolderError, match="holds a fidelity run of profile smoke, seed 0") as e:
            run_fidelity(other, echo=lambda line: None)
        assert "\n" not in str(e.value) and (out / "report.md").read_text() == before
    finally:
        for key in keys:
            FINDINGS.unregister(key)


def test_a_finding_that_failed_runs_again_when_the_run_continues(tmp_path):
    from gatesearch.findings import FidelityOptions, run_fidelity

    state = {"fail": True, "runs": 0}

    @register_finding("flaky_for_test", number=99, title="fails once", source="none")
    def flaky(ctx) -> Finding:
        state["runs"] += 1
        if state["fail"]:
            raise RuntimeError("the first time")
        return Finding(claims=(Claim(statement="ok", paper="-", ours="ok", reproduced=True),), numbers={},
                       setup="-")

    try:
        options = FidelityOptions(profile=tiny_profile(), out=tmp_path / "r", workdir=tmp_path,
                                  only=("flaky_for_test",))
        first = run_fidelity(options, echo=lambda line: None)
        assert first.outcomes[0].error == "RuntimeError: the first time"
        state["fail"] = False
        second = run_fidelity(options, echo=lambda line: None)
        assert state["runs"] == 2 and second.outcomes[0].error is None and second.outcomes[0].session == 2
    finally:
        FINDINGS.unregister("flaky_for_test")
