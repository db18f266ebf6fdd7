"""Train once, gate many: the dense network every trial of a search starts from, and its baseline.

Once-for-All (Cai et al., ICLR 2020) made specialising one trained network the cheap way to search many variants;
the gate papers start from a trained dense network too (Skip-Convolutions' norm gates need no training at all;
Gumbel gates, D-STEP and VA-RED² fine-tune it). Per (backbone, width) a search starts from:

- the user's weights (``model.weights``, renamed by ``model.prefix_map``), used as they are when they hold the
  task's head too; weights of the backbone alone get the head trained once (with the whole network);
- without weights, a dense network trained once from random weights.

Whatever is trained is cached in the work folder under a content key (what it was trained on: backbone, width,
task, classes, training data and settings, seed, starting weights and the architecture's parameter names and
shapes), as ``model.safetensors`` plus ``dense.json``, written atomically; the next search on the same data loads it
instead of training. The dense baseline (per-clip quality and latency) is evaluated once per search, with the same
weights, on the same held-out clips and device as every trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gatesearch.spaces import DataConfig, EvalConfig, SearchConfig, TrialConfig
from gatesearch.spaces.params import Choice, Fixed

from .trial import Baseline

CACHE_FORMAT = "gatesearch-dense/1"
WEIGHTS = "model.safetensors"
RECORD = "dense.json"


@dataclass(frozen=True)
class DensePlan:
    """What the driver decided for one (backbone, width) before anything runs."""

    key: str  # model key, "<backbone>@<width>"
    trial: TrialConfig  # the dense network, with the dense training's settings
    init: dict[str, torch.Tensor] | None  # the user's weights loaded into the dense model (None: random)
    init_source: dict[str, Any] | None  # {"path", "sha256"} of the user's file
    train: bool  # whether a training is needed (no weights, or weights without the task's head)
    cache_key: str | None  # content key of the trained weights (None: nothing to train)


@dataclass(frozen=True)
class DenseStart:
    """The trained dense weights of one (backbone, width), where they came from, and their baseline."""

    state: dict[str, torch.Tensor]  # the dense VideoModel's state dict
    source: dict[str, Any]  # provenance: path and sha256 of the weights trials start from (and the user's file)
    baseline: Baseline


def model_key(backbone: str, width: float) -> str:
    return f"{backbone}@{width:g}"


def model_pairs(cfg: SearchConfig) -> list[tuple[str, float]]:
    """Every (backbone, width) the space can sample: one dense network each."""
    def values(dom):
        return dom.values if isinstance(dom, Choice) else (dom.value,) if isinstance(dom, Fixed) else ()

    return [(b, float(w)) for b in values(cfg.space.shared["backbone"]) for w in values(cfg.space.shared["width"])]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plan(cfg: SearchConfig) -> list[DensePlan]:
    """Check the user's weights against every searched backbone (``WeightsError``: one line naming the file and
    the keys) and decide what must be trained; reads files only, writes nothing."""
    from gatesearch.backbones import build, load_weights
    from gatesearch.data.source import num_classes

    task = cfg.space.shared["task"].example()
    classes = num_classes(cfg.data)
    t = cfg.model.train
    plans = []
    source = None
    if cfg.model.weights:
        source = {"path": cfg.model.weights, "sha256": sha256_file(cfg.model.weights)}
    for backbone, width in model_pairs(cfg):
        trial = TrialConfig(backbone=backbone, width=width, task=task, gate="dense", clip_length=t.clip_length,
                            lr=t.lr, epochs=t.epochs, batch_size=t.batch_size, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        model = build(backbone, task=task, num_classes=classes, width=width)
        init, train = None, True
        if cfg.model.weights:
            load_weights(model, cfg.model.weights, prefix_map=cfg.model.prefix_map)
            init = model.state_dict()
            # a file without the task's head loads into the backbone alone: the head is trained once
            train = not _has_head(cfg.model.weights, cfg.model.prefix_map)
        key = None
        if train:
            key = cache_key(trial, cfg.data, classes, init_source=source, prefix_map=cfg.model.prefix_map,
                            signature=signature(model))
        plans.append(DensePlan(key=model_key(backbone, width), trial=trial, init=init, init_source=source,
                               train=train, cache_key=key))
    return plans


def _has_head(path: str, prefix_map: dict) -> bool:
    from gatesearch.backbones.weights import read_state_dict, rename

    return any(k.startswith("backbone.") for k in rename(read_state_dict(path), prefix_map or {}))


def signature(model: torch.nn.Module) -> list:
    """The architecture as the cache key sees it: every parameter and buffer name with its shape."""
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def cache_key(trial: TrialConfig, data: DataConfig, classes: int, *, init_source: dict | None, prefix_map: dict,
              signature: list) -> str:
    """Content key of a dense training: everything the trained weights depend on, and nothing else (the number
    of held-out clips, say, changes nothing)."""
    content = {
        "format": CACHE_FORMAT,
        "trial": trial.to_dict(),
        "classes": classes,
        "data": _data_identity(data),
        "init": init_source and {"sha256": init_source["sha256"], "prefix_map": prefix_map},
        "architecture": hashlib.sha256(json.dumps(signature).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _data_identity(data: DataConfig) -> dict[str, Any]:
    """The training data: its config, and for a folder of videos each file's name, size and modification time."""
    out = {"kind": data.kind, "train_clips": data.train_clips, "synthetic": data.synthetic, "folder": data.folder}
    if data.kind == "synthetic":  # every generator field, defaults filled in ({} and the defaults spelled out agree)
        full = dataclasses.asdict(data.synthetic_config(frames=2))
        full.pop("frames")  # clips are generated at the length the training asks for (the trial's clip_length)
        out["synthetic"] = full
    if data.kind == "video_folder":
        root = Path(data.folder["root"])
        out["files"] = sorted([str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
                              for p in root.rglob("*") if p.is_file())
    return out


class DenseCache:
    """Trained dense weights in ``<workdir>/dense/<key>/``: ``model.safetensors`` and ``dense.json`` (the key's
    content: what they were trained on). An entry appears whole or not at all (written to a temporary sibling,
    then renamed); a second search that trained the same network meanwhile keeps the first entry."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:32]

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        entry = self.path(key)
        try:
            record = json.loads((entry / RECORD).read_text())
            if record.get("key") != key:
                return None
            return load_file(str(entry / WEIGHTS))
        except (OSError, ValueError, SafetensorError):  # absent, or damaged: train again
            return None

    def store(self, key: str, state: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        entry = self.path(key)
        if self.load(key) is not None:  # another search stored the same training meanwhile
            return entry
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=self.folder))
        try:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
            (tmp / RECORD).write_text(json.dumps({"key": key, **record}, indent=2, default=str))
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry
            os.replace(tmp, entry)
        except OSError:
            if self.load(key) is None:  # lost a race to a whole entry: keep it
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return entry


def train_and_evaluate(plan_: DensePlan, cached: dict[str, torch.Tensor] | None, data: DataConfig,
                       evaluation: EvalConfig, *, plugins: tuple[str, ...], threads: int) -> dict[str, Any]:
    """Runs in a Ray worker holding the whole machine: train the dense network if needed (and not cached),
    then evaluate it on the held-out clips as a trial would be. Returns its state, per-clip quality, latency."""
    from gatesearch.data.source import load_clips, num_classes
    from gatesearch.models import build_model
    from gatesearch.objectives.device import DeviceLock
    from gatesearch.plugins import load_plugins

    from .trial import evaluate

    load_plugins(plugins)  # a plugin backbone must be registered in this worker too
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    state = cached if cached is not None else plan_.init
    trained = False
    loss = None
    if plan_.train and cached is None:
        model, loss = train_dense(plan_.trial, data, init=plan_.init)
        trained = True
    else:
        model = build_model(plan_.trial, num_classes(data), state=state)
    t1 = time.perf_counter()
    val = load_clips(data, frames=evaluation.frames, count=data.val_clips, split="val")
    lock = DeviceLock()
    try:
        outcome = evaluate(model, plan_.trial, val, evaluation, lock=lock,
                           latency_threads=len(os.sched_getaffinity(0)))  # as every trial measures
    finally:
        lock.close()
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "trained": trained,
            "train_loss": loss, "train_s": t1 - t0, "per_clip": outcome.per_clip.tolist(),
            "metrics": outcome.metrics}


def train_dense(trial: TrialConfig, data: DataConfig, *,
                init: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, float]:
    """Train the dense network of ``trial`` on ``data``'s training clips, from ``init`` (the user's weights) or
    random weights seeded by ``trial.seed``: the one place a dense start is trained (a search's Ray task and
    ``gatesearch fidelity`` both come here). Returns the trained model and its last epoch's mean loss."""
    from gatesearch.data.source import load_clips, num_classes
    from gatesearch.models import build_model

    from .trial import train

    model = build_model(trial, num_classes(data), state=init)
    clips = load_clips(data, frames=trial.clip_length, count=data.train_clips, split="train")
    if trial.task == "heatmap" and "heatmap" not in clips:
        raise ValueError("task 'heatmap' needs per-frame centre annotations, and this data has none")
    loss = train(model, trial, clips)
    return model, loss


def record(trial: TrialConfig, data: DataConfig, *, init_source: dict | None, prefix_map: dict | None,
           loss: float | None, seconds: float) -> dict[str, Any]:
    """What ``dense.json`` says of a cached training (beside its key): what it was trained on, its loss, time."""
    return {"trained_on": {"trial": trial.to_dict(), "data": dataclasses.asdict(data), "init": init_source,
                           "prefix_map": prefix_map},
            "train_loss": loss, "train_s": seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def untrained_key(trial: TrialConfig, data: DataConfig) -> str:
    """The cache key of the dense network of ``trial`` trained from random weights on ``data`` (what ``plan``
    computes for a search without ``model.weights``)."""
    from gatesearch.backbones import build
    from gatesearch.data.source import num_classes

    classes = num_classes(data)
    model = build(trial.backbone, task=trial.task, num_classes=classes, width=trial.width)
    return cache_key(trial, data, classes, init_source=None, prefix_map={}, signature=signature(model))


@dataclass(frozen=True)
class CachedDense:
    """Dense weights from ``cached_dense``: the state, its cache entry, and whether they were trained just now."""

    state: dict[str, torch.Tensor]
    entry: Path  # <workdir>/dense/<key>/
    key: str
    trained: bool
    seconds: float  # training (0 when loaded)


def cached_dense(trial: TrialConfig, data: DataConfig, cache: DenseCache) -> CachedDense:
    """The dense network of ``trial`` trained once from random weights on ``data``: loaded from ``cache`` when a
    search or an earlier run trained it on the same settings, else trained now (in this process) and stored."""
    key = untrained_key(trial, data)
    state = cache.load(key)
    if state is not None:
        return CachedDense(state=state, entry=cache.path(key), key=key, trained=False, seconds=0.0)
    start = time.perf_counter()
    model, loss = train_dense(trial, data)
    seconds = time.perf_counter() - start
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    entry = cache.store(key, state, record(trial, data, init_source=None, prefix_map={}, loss=loss, seconds=seconds))
    return CachedDense(state=state, entry=entry, key=key, trained=True, seconds=seconds)


def prepare(cfg: SearchConfig, plans: list[DensePlan], cache: DenseCache, *, cpus: int, echo) -> dict[str, DenseStart]:
    """The dense start of every (backbone, width): cached or trained once, then its baseline, one at a time on
    the whole machine (a Ray task each, so they run where trials run)."""
    import ray

    node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    cpus = max(1, min(cpus, node_cpus))  # one task runs on one node
    remote = ray.remote(train_and_evaluate).options(num_cpus=cpus, max_retries=0)
    starts = {}
    for p in plans:
        cached = cache.load(p.cache_key) if p.train else None
        if p.train and cached is None:
            what = "the task's head on the given weights" if p.init is not None else "the dense network"
            echo(f"dense {p.key}: training {what} once ({p.trial.epochs} epochs, cached for later searches)")
        out = ray.get(remote.remote(p, cached, cfg.data, cfg.evaluation, plugins=cfg.plugins, threads=cpus))
        source: dict[str, Any] = {"init": p.init_source}
        if p.train:
            if out["trained"]:
                cache.store(p.cache_key, out["state"], record(p.trial, cfg.data, init_source=p.init_source,
                                                              prefix_map=cfg.model.prefix_map,
                                                              loss=out["train_loss"], seconds=out["train_s"]))
            entry = cache.path(p.cache_key) / WEIGHTS
            source.update(path=str(entry), sha256=sha256_file(entry), cache_key=p.cache_key, trained=out["trained"])
        else:
            source.update(path=p.init_source["path"], sha256=p.init_source["sha256"])
        m = out["metrics"]
        how = "trained" if out["trained"] else "from cache" if p.train else "given"
        echo(f"dense {p.key} ({how}): quality {m['quality']:.3f} on {len(out['per_clip'])} held-out clips, "
             f"{m['latency_ms']:.2f} ms/frame, {m['macs'] / 1e6:.1f} MMACs")
        baseline = Baseline(per_clip=tuple(out["per_clip"]), latency_ms=m["latency_ms"], macs=m["macs"])
        starts[p.key] = DenseStart(state=out["state"], source=source, baseline=baseline)
    return starts


__all__ = ["CachedDense", "DenseCache", "DensePlan", "DenseStart", "cache_key", "cached_dense", "model_key",
           "model_pairs", "plan", "prepare", "record", "sha256_file", "signature", "train_and_evaluate", "train_dense",
           "untrained_key"]
