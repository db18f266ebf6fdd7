"""The self-contained model artifact: weights as safetensors plus one JSON file.

The same folder is what a trial checkpoints and what ``gatesearch export``
writes, so an exported model is exactly the model that was measured.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "gatesearch-model/2"
#: what format /1 means differently (both changed in /2): an output-norm ε bounded ‖w‖₁·‖r‖₁ summed over the
#: output channels, now per output channel (policies/norm_gates.py); a Gumbel gate read the signed residual, now |r|
FORMAT_1 = "gatesearch-model/1"
WEIGHTS = "model.safetensors"
META = "gatesearch.json"


class ArtifactError(Exception):
    """A missing, incomplete or foreign artifact folder (one-line message)."""


@dataclass(frozen=True)
class Artifact:
    model: torch.nn.Module
    trial: Any  # TrialConfig
    meta: dict[str, Any]


def write_files(folder: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Write weights and metadata into an existing folder. A model with norm gates also writes each layer's ε
    (``layer_thresholds``: calibrated per layer, they are not the trial's one threshold)."""
    from safetensors.torch import save_file

    from gatesearch import __version__
    from gatesearch.policies.calibration import layer_thresholds

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    meta = {"format": FORMAT, "gatesearch_version": __version__, **meta}
    if thresholds := layer_thresholds(model):
        meta["layer_thresholds"] = thresholds
    (folder / META).write_text(json.dumps(meta, indent=2))


def save_artifact(out: Path, model: torch.nn.Module, meta: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write an artifact folder atomically: a temporary sibling, renamed when complete."""
    out = Path(out)
    if out.exists() and not (overwrite or (out.is_dir() and not any(out.iterdir()))):
        raise ArtifactError(f"{out}: already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_files(tmp, model, meta)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def trial_meta(trial, *, metrics: dict, data, num_classes: int, frame_shape, trial_id: str | None = None,
               search_id: str | None = None, weights: dict | None = None, plugins=()) -> dict[str, Any]:
    """``weights``: the trained weights the trial started from (path and sha256); ``plugins``: the user modules
    that register its backbone or gate (``gatesearch run --plugin``)."""
    import dataclasses

    return {
        "trial_id": trial_id,
        "search_id": search_id,
        "trial": trial.to_dict(),
        "metrics": metrics,
        "data": dataclasses.asdict(data),
        "num_classes": num_classes,
        "frame_shape": list(frame_shape),
        "weights": weights,
        "plugins": list(plugins),
    }


def read_meta(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    meta_path = folder / META
    if not meta_path.is_file():
        raise ArtifactError(f"{folder}: not a gatesearch artifact (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{meta_path}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_1):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"{meta_path}: foreign format {found!r}, expected {FORMAT!r}")
    if not (folder / WEIGHTS).is_file():
        raise ArtifactError(f"{folder}: incomplete artifact (no {WEIGHTS})")
    return meta


def load_artifact(folder: Path) -> Artifact:
    """Rebuild the gated model of an artifact folder, weights checked against its config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gatesearch.models import build_model
    from gatesearch.registry import UnknownNameError
    from gatesearch.spaces import TrialConfig

    meta = read_meta(folder)
    try:
        trial = TrialConfig.from_dict(meta["trial"])
        model = build_model(trial, int(meta["num_classes"]))
    except UnknownNameError as e:
        plugins = meta.get("plugins") or []
        if plugins:
            raise ArtifactError(f"{folder}: the model needs plugin {', '.join(plugins)} ({e}); "
                                "pass it with --plugin") from None
        raise ArtifactError(f"{Path(folder) / META}: bad configuration ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{Path(folder) / META}: bad configuration ({e})") from None
    try:
        state = load_file(str(Path(folder) / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{Path(folder) / WEIGHTS}: unreadable weights ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise ArtifactError(f"{Path(folder) / WEIGHTS}: weights do not match the configured model") from None
    if "layer_thresholds" in meta:  # optional: artifacts written before per-layer ε load as they were
        from gatesearch.policies.calibration import set_layer_thresholds

        if not isinstance(meta["layer_thresholds"], dict):
            raise ArtifactError(f"{Path(folder) / META}: layer_thresholds must map layer names to numbers")
        try:
            set_layer_thresholds(model, meta["layer_thresholds"])
        except ValueError as e:
            raise ArtifactError(f"{Path(folder) / META}: {e}") from None
    if meta["format"] == FORMAT_1:
        _from_format_1(model, trial, Path(folder) / META)
    model.eval()
    return Artifact(model=model, trial=trial, meta=meta)


def _from_format_1(model: torch.nn.Module, trial, meta_path: Path) -> None:
    """An artifact written before /2 runs as it did then: each output-norm layer's ε divided by its C_out gives the
    same decisions under the per-channel bound; a Gumbel gate's weights were learned on the signed residual and do
    not carry over to the gate on |r|, so that model is refused."""
    from gatesearch.policies.calibration import norm_layers

    if trial.gate == "gumbel":
        raise ArtifactError(f"{meta_path}: a Gumbel gate exported in {FORMAT_1} (it gated the signed residual; "
                            "the gate now reads |r_t|): its gate weights do not carry over, search again")
    for layer in norm_layers(model).values():
        if layer.gate.output_norm:
            layer.gate.threshold /= layer.conv.out_channels
            layer.reset_state()


def dense_twin(artifact: Artifact) -> torch.nn.Module:
    """The dense network the artifact's gate was applied to, with the artifact's weights (the gate's own left out):
    what its speed and output are compared against."""
    from gatesearch.backbones import build
    from gatesearch.policies import build_policy
    from gatesearch.policies.dense_twin import load_dense_twin

    trial = artifact.trial
    dense = build(trial.backbone, task=trial.task, num_classes=int(artifact.meta["num_classes"]), width=trial.width)
    try:
        load_dense_twin(dense, artifact.model.state_dict(), build_policy(trial.gate, **trial.knobs))
    except (ValueError, RuntimeError) as e:
        raise ArtifactError(f"no dense twin for this artifact: {e}") from None
    return dense.eval()
