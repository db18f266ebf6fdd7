"""``gatesearch fidelity``: the papers' findings re-run, reported line by line (gatesearch.findings).

The slow test runs the command end to end at the smoke profile and checks that the report is complete (every
finding has claims with numbers and a verdict, the plots exist, one MLflow run holds it), not that every verdict
is "reproduced": the report is a measurement.
"""

from __future__ import annotations

import json
import math

import pytest

from gatesearch.findings import FINDINGS, Claim, Finding
from gatesearch.findings.measure import front, mean_quality
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
    assert result.exit_code != 0 and "already exists" in result.output
    assert (used / "report.md").read_text() == "old"
    bad = tmp_path / "not_a_video.mp4"
    bad.write_text("text")
    result = cli("fidelity", "--profile", "smoke", "--video", str(bad), "--out", str(tmp_path / "new"))
    assert result.exit_code != 0 and "not_a_video.mp4" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_a_failing_finding_is_reported_not_reproduced(tmp_path, monkeypatch):
    """One finding raising does not stop the report; it says which and why, with a not-reproduced verdict."""
    from gatesearch.findings import FidelityOptions, get_profile, register_finding, run_fidelity

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
    """The whole command at the smoke profile: a verdict and numbers for every claim of every finding, the
    plots, the JSON and one finished MLflow run holding them."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "report"
    result = cli("fidelity", "--profile", "smoke", "--out", str(out), "--workdir", str(tmp_path / "wd"))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert [f["key"] for f in data["findings"]] == list(ISSUE_FINDINGS.values())
    assert data["profile"]["name"] == "smoke" and "seed" in data["profile"]
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
