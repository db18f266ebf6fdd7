"""A whole search described by one YAML file, validated before any trial starts.

Every error is a ``SpaceError`` with one line that names the offending key,
e.g. ``space.gates.input_norm.threshold.low: must be >= 0.0, got -1``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .joint import Space, parse_space
from .model import ModelConfig, parse_model
from .objectives import (
    Constraints,
    EarlyStopping,
    HypervolumeReference,
    LatencyTarget,
    parse_constraints,
    parse_early_stopping,
    parse_hypervolume_reference,
    parse_latency,
)
from .params import SpaceError
from .sections import section, typed

#: second objective (the first is always quality) -> the trial metric it is
OBJECTIVES = {"latency": "latency_ms", "macs": "macs"}
SAMPLERS = ("tpe", "nsga2", "random")


DATA_KINDS = ("synthetic", "video_folder")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    kind: str = "synthetic"  # "synthetic" (built in, no download) or "video_folder"
    train_clips: int = 96  # clips used for training (at most this many videos for a folder)
    val_clips: int = 24  # held-out clips for quality, MACs and density
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticConfig fields
    folder: dict[str, Any] = field(default_factory=dict)  # FolderConfig fields (root, height, width, ...)

    def synthetic_config(self, frames: int):
        """The generator's config; clips are generated at the length they are needed."""
        from gatesearch.data import SyntheticConfig

        return SyntheticConfig.from_dict({**self.synthetic, "frames": frames})

    def folder_config(self):
        from gatesearch.data.folder import FolderConfig

        return FolderConfig.from_dict(self.folder)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    frames: int = 16  # frames of each held-out clip, streamed one by one
    latency_warmup: int = 2  # untimed passes before timing (kernel selection, calibration)
    latency_repeats: int = 10  # timed passes over each latency clip; the median is reported, with the spread
    latency_clips: int = 4  # held-out clips latency is measured on (a gated model's speed depends on content)
    # T_test (Skip-Conv Table 4): dense reference frame every N frames; 0 = first frame only
    reference_every: int | str = "clip_length"

    def reset_every(self, clip_length: int) -> int | None:
        """The reference-frame period for a trial trained on clips of ``clip_length``."""
        n = clip_length if self.reference_every == "clip_length" else int(self.reference_every)
        return n or None


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    name: str = "search"  # MLflow experiment name and prefix of the search id
    trials: int = 12  # trials that end, completed or failed (an interrupted trial does not count)
    max_concurrent: int = 2  # trials running at once (each gets cpus / max_concurrent threads)
    seed: int = 0  # sampler seed and trial seed
    objective: str = "latency"  # second objective beside quality: "latency" or "macs"
    sampler: str = "tpe"  # Optuna multi-objective sampler
    # failed trials (crash, NaN, out of memory) tolerated before the search stops; None: no bound but the budget
    max_failures: int | None = None
    plugins: tuple[str, ...] = ()  # user modules (.py files or module names) registering backbones or gates
    model: ModelConfig = field(default_factory=ModelConfig)  # the trained weights trials start from
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    space: Space = None  # type: ignore[assignment]  # filled by load/parse
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)  # stop dominated trials at rungs
    constraints: Constraints = field(default_factory=Constraints)  # budgets; the front holds feasible trials
    latency: LatencyTarget = field(default_factory=LatencyTarget)  # where latency is measured
    hypervolume_reference: HypervolumeReference = field(default_factory=HypervolumeReference)
    warm_start: tuple[dict[str, Any], ...] = ()  # known configurations tried first ({gate: ..., knob: ...})

    @property
    def cost_key(self) -> str:
        """The trial metric of the second objective."""
        return OBJECTIVES[self.objective]

    def to_dict(self) -> dict[str, Any]:
        """The config as its YAML reads (``parse_search_config`` gives it back: a resumed search reads it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in SECTIONS:  # an unset optional key is left out, as in the YAML
            out[key] = {k: v for k, v in dataclasses.asdict(getattr(self, key)).items() if v is not None}
        ref = self.hypervolume_reference  # its cost is named as the objective reports it
        out["hypervolume_reference"] = {k: v for k, v in (("quality", ref.quality), (self.cost_key, ref.cost))
                                        if v is not None}
        out["plugins"] = list(self.plugins)
        out["space"] = self.space.to_yaml()
        out["warm_start"] = list(self.warm_start)
        return out


#: the sections of a search YAML that are dataclasses of their own, and how each is parsed
SECTIONS = ("model", "data", "evaluation", "early_stopping", "constraints", "latency", "hypervolume_reference")


def load_search_config(path: str | Path, *, plugins: tuple[str, ...] = (), **overrides: Any) -> SearchConfig:
    """Read and validate a search YAML; ``overrides`` replace top-level keys (CLI flags), ``plugins`` add to the
    YAML's (``--plugin``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpaceError(f"{path}: not valid YAML{where}") from None
    if raw is None or raw == {}:  # a blank file would otherwise search every gate with every default
        raise SpaceError(f"{path}: empty config; name at least the space to search (see `gatesearch search quick`)")
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if plugins:
        listed = raw.get("plugins") or []
        raw["plugins"] = [*(listed if isinstance(listed, list) else [listed]), *plugins]
    return parse_search_config(raw)


def parse_search_config(raw: dict[str, Any]) -> SearchConfig:
    """Validate a whole search. Plugins are imported first, so the space may name what they register."""
    from gatesearch.plugins import load_plugins

    raw = dict(raw)
    nested = {*SECTIONS, "plugins", "space", "warm_start"}
    simple = {f.name: f for f in dataclasses.fields(SearchConfig) if f.name not in nested}
    known = set(simple) | nested
    for key in raw:
        if key not in known:
            raise SpaceError(f"{key}: unknown key; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(SearchConfig)
    for key in simple:
        if key in raw:
            values[key] = typed(raw[key], hints[key], key)
    cfg = SearchConfig(**values)
    if cfg.trials < 1:
        raise SpaceError(f"trials: must be >= 1, got {cfg.trials}")
    if cfg.max_failures is not None and cfg.max_failures < 0:
        raise SpaceError(f"max_failures: must be >= 0, got {cfg.max_failures}")
    if cfg.max_concurrent < 1:
        raise SpaceError(f"max_concurrent: must be >= 1, got {cfg.max_concurrent}")
    if cfg.objective not in OBJECTIVES:
        raise SpaceError(f"objective: {cfg.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if cfg.sampler not in SAMPLERS:
        raise SpaceError(f"sampler: {cfg.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if not cfg.name or any(c in cfg.name for c in "/\\ "):
        raise SpaceError(f"name: must be non-empty without spaces or slashes, got {cfg.name!r}")
    data = section(DataConfig, raw.get("data"), "data", minimum={"train_clips": 1, "val_clips": 1})
    if data.kind not in DATA_KINDS:
        raise SpaceError(f"data.kind: {data.kind!r} is not one of {', '.join(DATA_KINDS)}")
    data = _check_data_source(data)
    minimum = {f.name: 0 if f.name == "latency_warmup" else 1 for f in dataclasses.fields(EvalConfig)
               if f.name != "reference_every"}
    evaluation = section(EvalConfig, raw.get("evaluation"), "evaluation", minimum=minimum)
    ref = evaluation.reference_every
    if ref != "clip_length" and not (isinstance(ref, int) and not isinstance(ref, bool) and ref >= 0):
        raise SpaceError(f"evaluation.reference_every: expected clip_length or an int >= 0, got {ref!r}")
    plugins = load_plugins(raw.get("plugins"))  # before the space, which may name what they register
    model = parse_model(raw.get("model"))
    space = parse_space(raw.get("space"), seed=cfg.seed, model=model)
    warm = raw.get("warm_start") or []
    if not isinstance(warm, list):
        raise SpaceError(f"warm_start: expected a list of configurations, got {type(warm).__name__}")
    for i, point in enumerate(warm):
        space.enqueue_params(point, f"warm_start[{i}]")  # checked here, enqueued by the searcher
    warm_start = tuple(dict(point) for point in warm)
    return dataclasses.replace(
        cfg, plugins=plugins, model=model, data=data, evaluation=evaluation, space=space, warm_start=warm_start,
        early_stopping=parse_early_stopping(raw.get("early_stopping")),
        constraints=parse_constraints(raw.get("constraints")),
        latency=parse_latency(raw.get("latency")),
        hypervolume_reference=parse_hypervolume_reference(raw.get("hypervolume_reference"), cfg.cost_key),
    )


def _check_data_source(data: DataConfig) -> DataConfig:
    """Validate the section of the chosen kind; a folder's root becomes absolute (trials run elsewhere)."""
    if data.kind == "synthetic":
        if data.folder:
            raise SpaceError("data.folder: only used with kind: video_folder")
        try:
            data.synthetic_config(2)
        except (ValueError, TypeError) as e:
            raise SpaceError(f"data.synthetic: {e}") from None
        return data
    if data.synthetic:
        raise SpaceError("data.synthetic: only used with kind: synthetic")
    try:
        folder = data.folder_config()
    except (ValueError, TypeError) as e:
        raise SpaceError(f"data.folder: {e}") from None
    root = Path(folder.root).expanduser()
    if not root.is_dir():
        raise SpaceError(f"data.folder.root: {root} is not a folder")
    return dataclasses.replace(data, folder={**data.folder, "root": str(root.resolve())})
