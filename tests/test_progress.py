"""What a running search shows: the live table on a terminal, plain lines elsewhere."""

import io
import re
import time

import pytest

from gatesearch.search.progress import LiveProgress, PlainProgress, Running, SearchState, clock


def running_state():
    state = SearchState(search_id="s-1", trials=4, started=time.time() - 60)
    state.running["a1"] = Running(trial_id="a1", gate="input_norm", epochs=8, epoch=2)
    state.running["b2"] = Running(trial_id="b2", gate="gumbel", epochs=8, epoch=6)
    state.done, state.failed = 1, 0
    state.front = {"front": 1, "best quality": 0.75}
    return state


def test_eta_counts_the_running_trials_epochs():
    state = running_state()
    # 1 done + 2/8 + 6/8 = 2 of 4 trials in 60 s: 60 s left
    assert abs(state.eta() - 60) < 1
    assert SearchState(search_id="s", trials=3).eta() is None
    assert clock(None) == "?" and clock(65) == "1:05" and clock(3725) == "1:02:05"


def test_live_table_shows_running_trials_counts_eta_and_front():
    from rich.console import Console

    out = io.StringIO()
    progress = LiveProgress(Console(file=out, force_terminal=True, width=140, color_system=None))
    state = running_state()
    progress.start(state)
    progress.refresh()
    progress.line("a0 input_norm -> quality 0.750")
    state.done, state.running = 2, {}
    progress.stop()
    text = out.getvalue()
    for expected in ("search s-1", "a1", "input_norm", "2/8", "b2", "gumbel", "6/8", "done 1/4", "ETA 1:00",
                     "front 1", "best quality 0.750", "a0 input_norm -> quality 0.750", "done 2/4"):
        assert expected in text, expected


def test_plain_lines_carry_the_status():
    lines = []
    progress = PlainProgress(lines.append)
    progress.start(running_state())
    progress.refresh()
    progress.line("a1 started: input_norm")
    progress.stop()
    assert len(lines) == 1 and re.fullmatch(r"a1 started: input_norm \| done 1/4 \| failed 0 \| running 2 \| "
                                            r"elapsed 1:0\d \| ETA 1:0\d \| front 1 \| best quality 0.750", lines[0])


@pytest.mark.parametrize("tty, as_json, live", [(True, False, True), (True, True, False), (False, False, False)])
def test_cli_shows_the_live_table_only_on_a_terminal_without_json(monkeypatch, tty, as_json, live):
    import sys

    from gatesearch.cli import _progress

    class Stderr(io.StringIO):
        def isatty(self):
            return tty

    monkeypatch.setattr(sys, "stderr", Stderr())
    assert isinstance(_progress(as_json), LiveProgress) == live
