"""Screenshot check: the MLflow UI on a finished quick search, as a new user opens it.

    python docs/screenshots/take.py [WORKDIR] [--out docs/screenshots]

Runs ``gatesearch search quick`` into WORKDIR (default: a fresh temporary folder) unless WORKDIR already holds
a finished search, serves its store with ``mlflow ui`` on a free local port, and photographs with headless
Chromium (Debian's ``chromium`` package) the link the search prints: the experiment's runs table
(``mlflow-runs.png``) and its logged models (``mlflow-models.png``). Then it checks what the runs page must
show, from the page's own text (``chromium --dump-dom``): the Model training view, the runs table with the
quality and latency columns, and a trial row. Exits non-zero, naming what is missing, when it does not.
Everything it starts (the MLflow server and its workers, Chromium) is stopped by process group at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--window-size=1900,1000", "--virtual-time-budget=25000"]
#: what the runs page must say (the column headers of the runs table and the view's switch)
EXPECTED = ("Model training", "quality", "latency_ms", "macs", "gate", "gatesearch.pareto")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", nargs="?", type=Path, help="a gatesearch work folder (default: a new quick search)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent, help="where the PNGs go")
    args = ap.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gatesearch-shot-"))
    db = workdir / "mlflow.db"
    if not db.exists():
        subprocess.run([sys.executable, "-m", "gatesearch.cli", "search", "quick", "--workdir", str(workdir),
                        "--json"], check=True, env=env, stdout=subprocess.DEVNULL)
    uri = f"sqlite:///{db.resolve()}"
    link = ui_link(uri)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        host = f"http://127.0.0.1:{port}"
        wait_for(host)
        runs_url = link.replace("http://127.0.0.1:5000", host)
        models_url = re.sub(r"/runs\?.*", "/models?workflowType=machine_learning", runs_url)
        args.out.mkdir(parents=True, exist_ok=True)
        shoot(chromium, runs_url, args.out / "mlflow-runs.png")
        shoot(chromium, models_url, args.out / "mlflow-models.png")
        text = page_text(chromium, runs_url)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    missing = [word for word in EXPECTED if word not in text]
    if missing:
        print(f"runs page of {runs_url} lacks: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(json.dumps({"workdir": str(workdir), "url": runs_url,
                      "screenshots": [str(args.out / "mlflow-runs.png"), str(args.out / "mlflow-models.png")]}))
    return 0


def ui_link(uri: str) -> str:
    """The runs-table link of the latest search in the store (what ``gatesearch search`` prints)."""
    from gatesearch.search.tracking import Tracker

    tracker = Tracker(uri)
    return tracker.ui_url(tracker.search_run(None).info.run_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"mlflow ui did not answer at {url} within {timeout:.0f} s")


def chromium_run(chromium: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], check=True,
                              capture_output=True, text=True, timeout=180, start_new_session=True)


def shoot(chromium: str, url: str, png: Path) -> None:
    chromium_run(chromium, f"--screenshot={png}", url)


def page_text(chromium: str, url: str) -> str:
    """The rendered page's text (tags stripped)."""
    html = chromium_run(chromium, "--dump-dom", url).stdout
    return re.sub(r"<[^>]+>", " ", html)


if __name__ == "__main__":
    sys.exit(main())
