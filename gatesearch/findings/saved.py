"""What a fidelity run keeps in its report folder so that an interrupted run continues where it stopped.

A long report must survive a Ctrl-C, a crash or the end of a session without losing what was measured. The folder
holds ``run.json`` (what the run is: its profile with every size and seed, and the clip it times on; the sessions
that worked on it), one ``results/<finding>.json`` per finished finding (its claims, numbers, tables, and the gated
models finding 7 times, as recipes), and ``models/<digest>.safetensors`` per fine-tuned gate (with its recipe in
``<digest>.json``). Every file appears whole or not at all (written beside, then renamed); nothing is unpickled.
Running the same command with the same ``--out`` skips the findings whose results are there and rebuilds the
report from all of them; a different profile, seed or clip is refused in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gatesearch.atomic import write_atomic

from .registry import Claim, Finding

FORMAT = "gatesearch-fidelity/1"
RUN_FILE = "run.json"
RESULTS = "results"
MODELS = "models"


class RunFolderError(FileExistsError):
    """The report folder holds something this run must not continue or overwrite (the message is one line)."""


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str, ensure_ascii=False)


def identity(profile, video: Path | None) -> dict[str, Any]:
    """What makes two runs the same run: the whole profile (sizes, sweeps, seeds) and the timed clip's content."""
    from gatesearch.search.dense import sha256_file

    clip = None
    if video is not None:
        clip = {"name": Path(video).name, "sha256": sha256_file(video)}
    return json.loads(json.dumps({"profile": profile.to_dict(), "video": clip}))  # as run.json reads back


def _describe(ident: dict[str, Any]) -> str:
    p, v = ident["profile"], ident["video"]
    return f"profile {p['name']}, seed {p['seed']}, video {v['name'] if v else 'none'}"


def commit() -> str | None:
    """The checkout's git commit (which code measured a finding), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class RunFolder:
    """The report folder of one run, over every session that works on it."""

    out: Path
    record: dict[str, Any]  # run.json

    @property
    def sessions(self) -> list[dict[str, Any]]:
        return self.record["sessions"]

    def save_record(self) -> None:
        write_atomic(self.out / RUN_FILE, _json(self.record))

    def results(self) -> dict[str, dict[str, Any]]:
        """Saved results by finding key (a damaged or partial file reads as absent: that finding runs again)."""
        found = {}
        for path in sorted((self.out / RESULTS).glob("*.json")):
            try:
                data = json.loads(path.read_text())
                if data.get("format") == FORMAT and data.get("key") == path.stem:
                    found[path.stem] = data
            except (OSError, ValueError):
                continue
        return found

    def save_result(self, key: str, *, seconds: float, error: str | None, finding: Finding,
                    candidates: list[dict[str, Any]]) -> None:
        data = {"format": FORMAT, "key": key, "seconds": seconds, "error": error, "session": len(self.sessions),
                "finding": finding_to_dict(finding), "candidates": candidates}
        write_atomic(self.out / RESULTS / f"{key}.json", _json(data))

    def model_path(self, recipe: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self.out / MODELS / f"{digest}.safetensors"

    def save_model(self, recipe: dict[str, Any], model: torch.nn.Module) -> Path:
        """A fine-tuned gated model's weights (safetensors) and recipe (JSON); the weights file is the marker."""
        from safetensors.torch import save

        path = self.model_path(recipe)
        write_atomic(path.with_suffix(".json"), _json(recipe))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        write_atomic(path, save(state, metadata={"format": FORMAT}))
        return path

    def load_model(self, recipe: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The saved state of ``recipe``'s model, or None (never saved, or damaged: it is fine-tuned again)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.model_path(recipe)
        try:
            return load_file(str(path))
        except (OSError, ValueError, SafetensorError):
            return None


def open_folder(out: Path, ident: dict[str, Any]) -> RunFolder | None:
    """The run folder at ``out`` to continue (its identity must be ``ident``), or None for a new run (``out`` absent
    or empty). ``RunFolderError`` (one line) for a folder of another run, or one with other files in it."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} is a file, not a report folder; give another --out")
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        record = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        raise RunFolderError(f"{out} already exists and is neither empty nor a fidelity run to continue; give "
                             "another --out") from None
    theirs = {"profile": record.get("profile"), "video": record.get("video")}
    if record.get("format") != FORMAT or theirs != ident:
        mine = _describe(ident)
        other = _describe(theirs) if record.get("format") == FORMAT and theirs["profile"] else "another format"
        if record.get("format") == FORMAT and theirs["profile"] and _describe(theirs) == mine:
            other += " with other sizes"
        raise RunFolderError(f"{out} holds a fidelity run of {other}, not {mine}; continue it with its own "
                             "settings or give another --out")
    return RunFolder(out=out, record=record)


def new_folder(out: Path, ident: dict[str, Any], command: str) -> RunFolder:
    out.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(out=out, record={"format": FORMAT, **ident, "command": command, "sessions": []})
    folder.save_record()
    return folder


def finding_to_dict(f: Finding) -> dict[str, Any]:
    return {"claims": [dataclasses.asdict(c) for c in f.claims], "numbers": f.numbers, "setup": f.setup,
            "details": f.details, "plots": list(f.plots)}


def finding_from_dict(d: dict[str, Any]) -> Finding:
    return Finding(claims=tuple(Claim(**c) for c in d["claims"]),
                   numbers={k: float(v) for k, v in d["numbers"].items()}, setup=d["setup"], details=d["details"],
                   plots=tuple(d["plots"]))


__all__ = ["FORMAT", "RunFolder", "RunFolderError", "commit", "finding_from_dict", "finding_to_dict", "identity",
           "new_folder", "open_folder", "write_atomic"]
