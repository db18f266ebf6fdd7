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

from .model import ModelConfig
from .params import Choice, Domain, Fixed, Param, Range, SpaceError
from .trial import TrialConfig

#: the parameters every trial has, whatever its gate, with what a search samples when the YAML does not say
SHARED: dict[str, Param] = {
    p.name: p
    for p in [
        Param(name="backbone", kind=str, default="tiny", doc="backbone registry name"),
        Param(name="width", kind=float, low=0.0, low_open=True, high=8.0, default=1.0,
              doc="channel-width multiplier"),
        Param(name="task", kind=str, choices=("classification", "heatmap"), default="classification",
              doc="task and quality metric"),
        Param(name="clip_length", kind=int, choices=(2, 4, 8, 16), default=[2, 4, 8], doc="frames per training clip"),
        Param(name="lr", kind=float, low=0.0, low_open=True, high=1.0, default={"low": 1e-3, "high": 1e-2, "log": True},
              doc="learning rate"),
        Param(name="epochs", kind=int, low=1, high=1000, default=3, doc="training epochs"),
        Param(name="batch_size", kind=int, low=1, high=1024, default=8, doc="clips per step"),
    ]
}
#: the gate (policy registry name); its knobs are declared by the gate's policy
GATE = Param(name="gate", kind=str, doc="policy registry name")
#: shared parameters that only matter to a trial that trains
TRAINING = ("lr", "batch_size")


@dataclass(frozen=True)
class Space:
    """A validated joint space; ``suggest`` maps an Optuna trial to a TrialConfig."""

    gate: Choice
    shared: dict[str, Domain] = field(default_factory=dict)
    gate_params: dict[str, dict[str, Domain]] = field(default_factory=dict)  # gate -> param -> domain
    seed: int = 0
    #: trials start from shared trained weights and train this many epochs per gate (``ModelConfig.trial_epochs``);
    #: None: every trial trains from scratch for the sampled ``epochs``
    epochs_by_gate: dict[str, int] | None = None

    def suggest(self, trial) -> TrialConfig:
        """Define-by-run sampling; no side effects beyond the trial's own record. A trial that does not train
        samples no training knob (learning rate, batch size): they would mean nothing."""
        gate = self.gate.suggest(trial, "gate")
        epochs = None if self.epochs_by_gate is None else self.epochs_by_gate[gate]
        values = {name: dom.suggest(trial, name) for name, dom in self.shared.items()
                  if not (epochs == 0 and name in TRAINING)}
        if epochs is not None:
            values["epochs"] = epochs
        knobs = {name: dom.suggest(trial, f"{gate}.{name}") for name, dom in self.gate_params[gate].items()}
        return TrialConfig(gate=gate, seed=self.seed, knobs=knobs, **values)

    def define_by_run(self, trial) -> dict[str, Any]:
        """The function given to Ray Tune's OptunaSearch: the resolved config under ``trial``."""
        return {"trial": self.suggest(trial).to_dict()}

    def enqueue_params(self, point: Any, where: str) -> dict[str, Any]:
        """A known configuration (``warm_start:`` entry: the gate and any shared parameters or knobs) as the Optuna
        parameters that make ``suggest`` return it (``Study.enqueue_trial``); what it leaves out is sampled."""
        from gatesearch.policies import POLICIES

        if not isinstance(point, dict):
            raise SpaceError(f"{where}: expected a mapping such as {{gate: dense}}, got {point!r}")
        gate = point.get("gate")
        if gate not in self.gate.values:
            raise SpaceError(f"{where}.gate: expected one of the searched gates ({', '.join(self.gate.values)}), "
                             f"got {gate!r}")
        params = {"gate": gate} if self.gate.sampled else {}
        for key, value in point.items():
            if key == "gate":
                continue
            if key in self.shared:
                param, dom, name = SHARED[key], self.shared[key], key
            elif key in self.gate_params[gate]:
                param, dom, name = POLICIES.get(gate).takes()[key], self.gate_params[gate][key], f"{gate}.{key}"
            else:
                known = ", ".join([*self.shared, *self.gate_params[gate]])
                raise SpaceError(f"{where}.{key}: not a parameter of gate {gate!r} in this search (known: {known})")
            value = param.check(value, f"{where}.{key}")
            if not dom.holds(value):
                raise SpaceError(f"{where}.{key}: {value!r} is outside the searched domain {dom.to_yaml()!r}")
            if dom.sampled:
                params[name] = value
        return params

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gate": self.gate.to_yaml()}
        out.update({k: d.to_yaml() for k, d in self.shared.items()})
        out["gates"] = {g: {k: d.to_yaml() for k, d in ps.items()} for g, ps in self.gate_params.items() if ps}
        return out  # epochs_by_gate follows from the model: section


def parse_space(raw: Any, *, seed: int = 0, model: ModelConfig | None = None) -> Space:
    """Validate the ``space:`` section of a search YAML into a Space. With ``model`` (the search's ``model:``
    section, unless it trains from scratch) trials start from shared trained weights: the epochs a trial trains
    follow from its gate, and the backbone and width must take finitely many values (one dense network each)."""
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

    shared_weights = model is not None and not model.from_scratch
    if shared_weights and "epochs" in raw:
        raise SpaceError("space.epochs: trials start from the trained dense network; set model.finetune_epochs "
                         "(or model.from_scratch: true to train every trial from random weights)")
    gate_given = "gate" in raw
    gate_dom = GATE.domain(raw.pop("gate", list(POLICIES)), "space.gate")
    gates = gate_dom.values if isinstance(gate_dom, Choice) else (gate_dom.value,)
    for g in gates:
        if g not in POLICIES:
            raise SpaceError(f"space.gate: unknown gate {g!r}; known: {', '.join(POLICIES)}")

    takes = {g: POLICIES.get(g).takes() for g in gates}  # gate -> knob -> Param
    searched = {g: {p.name for p in POLICIES.get(g).params} for g in gates}  # options stay out unless named
    takers = {k for knobs in takes.values() for k in knobs}
    every_knob = dict.fromkeys(k for g in POLICIES for k in POLICIES.get(g).takes())  # of any registered gate
    shared: dict[str, Domain] = {}
    common: dict[str, Any] = {}  # a knob named at the top level applies to every searched gate that takes it
    for key, value in raw.items():
        if key in SHARED:
            shared[key] = SHARED[key].domain(value, f"space.{key}")
        elif key in takers:
            common[key] = value
        elif key in every_knob:
            raise SpaceError(f"space.{key}: not taken by any searched gate ({', '.join(gates)})")
        else:
            raise SpaceError(f"space.{key}: unknown parameter; known: {', '.join([*SHARED, 'gate', *every_knob])}")
    for key, p in SHARED.items():
        shared.setdefault(key, p.domain(p.default, f"space.{key}"))
    _check_registered(shared["backbone"], BACKBONES, "space.backbone")
    if isinstance(shared["task"], Choice) and len(shared["task"].values) > 1:
        raise SpaceError("space.task: one task per search (the quality objective follows the task); "
                         "run one search per task")
    from .compat import incompatibility

    for b in _values(shared["backbone"]):
        if why := incompatibility(b, "dense", _values(shared["task"])[0]):
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
            if key not in takes[g]:
                known = ", ".join(takes[g]) or "no parameters"
                raise SpaceError(f"space.gates.{g}.{key}: gate {g!r} does not take {key!r} (it takes {known})")
        doms = {}
        for key, p in takes[g].items():
            if key in overrides:
                doms[key] = p.search_domain(overrides[key], f"space.gates.{g}.{key}")
            elif key in common:
                doms[key] = p.search_domain(common[key], f"space.{key}")
            elif key in searched[g]:
                doms[key] = p.search_domain(p.default, f"space.gates.{g}.{key}")
        gate_params[g] = doms
    gates = _compatible_gates(gates, shared, strict=gate_given)
    gate_params = {g: gate_params[g] for g in gates}
    epochs_by_gate = None
    if shared_weights:
        if isinstance(shared["width"], Range):
            raise SpaceError("space.width: trials share one trained network per width, so give a value or a list, "
                             "not a range (or model.from_scratch: true)")
        del shared["epochs"]
        epochs_by_gate = {g: model.trial_epochs(POLICIES.get(g).fine_tunes) for g in gates}
    return Space(gate=Choice(gates), shared=shared, gate_params=gate_params, seed=seed, epochs_by_gate=epochs_by_gate)


def _compatible_gates(gates: tuple, shared: dict[str, Domain], *, strict: bool) -> tuple:
    """The gates that can convert every searched backbone (by the structure they require). A gate the user named
    that cannot convert one of them is an error; when the gate was left out (all gates), those are dropped."""
    from .compat import incompatibility

    backbones = _values(shared["backbone"])
    task = _values(shared["task"])[0]
    kept = []
    for g in gates:
        reasons = [(b, why) for b in backbones if (why := incompatibility(b, g, task))]
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
