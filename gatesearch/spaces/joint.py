"""The joint space: which parameters exist, which gate takes which, and sampling.

Parameters are conditional (Optuna define-by-run): the gate is sampled first,
then the shared parameters, then only the parameters the chosen gate declares.
A gate's parameters get Optuna names ``<gate>.<param>`` so that, say, the ε of
the input-norm gate and the ε of the output-norm gate are separate
distributions with ranges of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .params import Choice, Domain, Fixed, Param, SpaceError
from .trial import TrialConfig

#: every parameter of the joint space and what values are legal
PARAMS: dict[str, Param] = {
    p.name: p
    for p in [
        Param(name="backbone", kind=str, doc="backbone registry name"),
        Param(name="width", kind=float, low=0.0, low_open=True, high=8.0, doc="channel-width multiplier"),
        Param(name="task", kind=str, choices=("classification", "heatmap"), doc="task and quality metric"),
        Param(name="gate", kind=str, doc="policy registry name"),
        Param(name="threshold", kind=float, low=0.0, doc="ε of the norm gates"),
        Param(name="beta", kind=float, low=0.0, doc="β of the Gumbel gate loss (Skip-Conv Eq. 9)"),
        Param(name="target_flops_ratio", kind=float, low=0.0, low_open=True, high=1.0,
              doc="D: D-STEP target FLOPs ratio (Eq. 3)"),
        Param(name="block_size", kind=int, choices=(1, 2, 4, 8), doc="mask block size b"),
        Param(name="reference", kind=str, choices=("frame", "block"),
              doc="norm gates' residual: previous frame (Eq. 3) or each block's last computed input"),
        Param(name="per_value", kind=bool, doc="norm gates: ε per input value (threshold ε·C_in·k²)"),
        Param(name="search_space_size", kind=int, choices=(2, 3, 4), doc="S: VA-RED² alternatives per dimension"),
        Param(name="lambda_e", kind=float, low=0.0, doc="λ_e: weight of VA-RED²'s efficiency loss (Eq. 3.6)"),
        Param(name="clip_length", kind=int, choices=(2, 4, 8, 16), doc="frames per training clip"),
        Param(name="lr", kind=float, low=0.0, low_open=True, high=1.0, doc="learning rate"),
        Param(name="epochs", kind=int, low=1, high=1000, doc="training epochs"),
        Param(name="batch_size", kind=int, low=1, high=1024, doc="clips per step"),
    ]
}

#: parameters every trial has, whatever its gate, with their defaults
SHARED: dict[str, Any] = {
    "backbone": "tiny",
    "width": 1.0,
    "task": "classification",
    "clip_length": [2, 4, 8],
    "lr": {"low": 1e-3, "high": 1e-2, "log": True},
    "epochs": 3,
    "batch_size": 8,
}


@dataclass(frozen=True)
class Space:
    """A validated joint space; ``suggest`` maps an Optuna trial to a TrialConfig."""

    gate: Choice
    shared: dict[str, Domain] = field(default_factory=dict)
    gate_params: dict[str, dict[str, Domain]] = field(default_factory=dict)  # gate -> param -> domain
    seed: int = 0

    def suggest(self, trial) -> TrialConfig:
        """Define-by-run sampling; no side effects beyond the trial's own record."""
        gate = self.gate.suggest(trial, "gate")
        values = {name: dom.suggest(trial, name) for name, dom in self.shared.items()}
        for name, dom in self.gate_params[gate].items():
            values[name] = dom.suggest(trial, f"{gate}.{name}")
        return TrialConfig(gate=gate, seed=self.seed, **values)

    def define_by_run(self, trial) -> dict[str, Any]:
        """The function given to Ray Tune's OptunaSearch: the resolved config under ``trial``."""
        return {"trial": self.suggest(trial).to_dict()}

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gate": self.gate.to_yaml()}
        out.update({k: d.to_yaml() for k, d in self.shared.items()})
        out["gates"] = {g: {k: d.to_yaml() for k, d in ps.items()} for g, ps in self.gate_params.items() if ps}
        return out


def parse_space(raw: Any, *, seed: int = 0) -> Space:
    """Validate the ``space:`` section of a search YAML into a Space."""
    from gatesearch.backbones import BACKBONES
    from gatesearch.policies import POLICIES

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpaceError(f"space: expected a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    per_gate = raw.pop("gates", None) or {}
    if not isinstance(per_gate, dict):
        raise SpaceError("space.gates: expected a mapping of gate name -> parameters")

    gate_given = "gate" in raw
    gate_raw = raw.pop("gate", list(POLICIES))
    gate_dom = PARAMS["gate"].domain(gate_raw, "space.gate")
    gates = gate_dom.values if isinstance(gate_dom, Choice) else (gate_dom.value,)
    for g in gates:
        if g not in POLICIES:
            raise SpaceError(f"space.gate: unknown gate {g!r}; known: {', '.join(POLICIES)}")
    gate_dom = Choice(tuple(gates))

    # options (not searched unless the YAML names them) ride along with the parameters
    gate_takes = {g: {**POLICIES.get(g).params, **POLICIES.get(g).options} for g in gates}
    searched = {g: POLICIES.get(g).params for g in gates}
    takers = {p for params in gate_takes.values() for p in params}
    shared: dict[str, Domain] = {}
    common: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SHARED:
            shared[key] = PARAMS[key].domain(value, f"space.{key}")
        elif key in takers:
            common[key] = value
        elif key in PARAMS:
            raise SpaceError(f"space.{key}: not taken by any searched gate ({', '.join(gates)})")
        else:
            raise SpaceError(f"space.{key}: unknown parameter; known: {', '.join(PARAMS)}")
    for key, default in SHARED.items():
        shared.setdefault(key, PARAMS[key].domain(default, f"space.{key}"))
    _check_registered(shared["backbone"], BACKBONES, "space.backbone")
    if isinstance(shared["task"], Choice) and len(shared["task"].values) > 1:
        raise SpaceError("space.task: one task per search (the quality objective follows the task); "
                         "run one search per task")
    from .compat import incompatibility

    for b in _values(shared["backbone"]):
        if why := incompatibility(b, "dense", _values(shared["task"])[0], {}):
            raise SpaceError(f"space.backbone: {b!r}: {why}")

    gate_params: dict[str, dict[str, Domain]] = {}
    for g in per_gate:
        if g not in gates:
            raise SpaceError(f"space.gates.{g}: gate {g!r} is not searched (space.gate: {', '.join(gates)})")
    for g in gates:
        overrides = per_gate.get(g) or {}
        if not isinstance(overrides, dict):
            raise SpaceError(f"space.gates.{g}: expected a mapping of parameter -> values")
        for key in overrides:
            if key not in gate_takes[g]:
                takes = ", ".join(gate_takes[g]) or "no parameters"
                raise SpaceError(f"space.gates.{g}.{key}: gate {g!r} does not take {key!r} (it takes {takes})")
        doms = {}
        for key, default in gate_takes[g].items():
            if key not in searched[g] and key not in overrides and key not in common:
                continue  # an option left to its default
            where = f"space.gates.{g}.{key}" if key in overrides else f"space.{key}"
            value = overrides.get(key, common.get(key, default))
            doms[key] = PARAMS[key].domain(value, where)
            if key == "per_value" and not isinstance(doms[key], Fixed):
                raise SpaceError(f"{where}: true or false, not both (it changes the scale of ε, so one threshold "
                                 "range cannot serve both); run one search per setting")
        gate_params[g] = doms
    gates = _compatible_gates(gates, shared, gate_params, strict=gate_given)
    gate_params = {g: gate_params[g] for g in gates}
    return Space(gate=Choice(gates), shared=shared, gate_params=gate_params, seed=seed)


def _compatible_gates(gates: tuple, shared: dict[str, Domain], gate_params: dict[str, dict[str, Domain]], *,
                      strict: bool) -> tuple:
    """The gates that can convert every searched backbone. A gate the user named that cannot convert one of
    them is an error; when the gate was left out (all gates), the incompatible ones are dropped."""
    from .compat import example, incompatibility

    backbones = _values(shared["backbone"])
    task = _values(shared["task"])[0]
    kept = []
    for g in gates:
        knobs = {k: example(d) for k, d in gate_params[g].items()}
        reasons = [(b, why) for b in backbones if (why := incompatibility(b, g, task, knobs))]
        if reasons and strict:
            b, why = reasons[0]
            raise SpaceError(f"space.gate: backbone {b!r} cannot take gate {g!r}: {why}; search them separately")
        if not reasons:
            kept.append(g)
    if not kept:
        raise SpaceError(f"space.gate: no gate can be applied to every backbone of space.backbone "
                         f"({', '.join(backbones)})")
    return tuple(kept)


def _values(dom: Domain) -> tuple:
    return dom.values if isinstance(dom, Choice) else (dom.value,) if isinstance(dom, Fixed) else ()


def _check_registered(dom: Domain, registry, where: str) -> None:
    for v in _values(dom):
        if v not in registry:
            raise SpaceError(f"{where}: unknown {registry.kind} {v!r}; known: {', '.join(registry)}")
