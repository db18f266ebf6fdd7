"""The policy (gate family) contract and its registry.

A gate is one file: a ``Policy`` subclass, registered by name, that declares everything the rest of gatesearch
needs to know about it. The joint space, the compatibility check, the trainer and the contract tests read these
declarations from the registry, so no other file names the gate or its knobs:

- ``params``: the knobs a search samples, as ``Param``s carrying their default domains;
- ``options``: knobs kept at their default unless a search names them;
- ``requires``: the structure the gate converts (``structure.Structure``), so an impossible (backbone, gate) pair
  is refused before any trial starts;
- ``keep_all()``: knobs under which the converted model, forced open (``force_open``), computes the dense network;
- ``example_knobs()``: legal knobs to build the gate with (the low end of each default domain unless overridden);
- ``apply(model)`` converts a model in place; ``loss``, ``on_epoch`` and ``streams`` are the trainer's hooks, and
  ``calibrate`` sets what a gate takes from data after training (the norm gates' per-layer ε).

``register_policy`` checks the declarations when the module is imported, so a gate that breaks the contract fails
at once with a message naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from gatesearch.registry import Registry
from gatesearch.spaces.params import Param, SpaceError

from .structure import Structure

POLICIES: Registry[type[Policy]] = Registry(
    "gate",
    "Contract: each entry is a Policy subclass; its docstring's first line is shown by `gatesearch list`.",
)


#: b: masks are constant on b×b blocks (Skip-Conv's structured sparsity; D-STEP's tile side p)
BLOCK_SIZE = Param(name="block_size", kind=int, choices=(1, 2, 4, 8), default=[1, 2, 4, 8],
                   doc="mask block size b (D-STEP: tile side p)")


class Policy:
    """Base class of a gate family."""

    #: the knobs a search samples, each with its legal values and default search domain
    params: ClassVar[tuple[Param, ...]] = ()
    #: knobs kept at ``Param.default`` unless a search names them
    options: ClassVar[tuple[Param, ...]] = ()
    #: structure the gate converts; a model without all of it is refused
    requires: ClassVar[tuple[Structure, ...]] = ()
    #: True when the gate has trainable parameters, so training must stream frames through it
    trains_gates: ClassVar[bool] = False
    #: True when the gate adds parameters of its own (a learned gate, a policy network): a trial that starts from
    #: trained weights fine-tunes them (``model.finetune_epochs``); without, the knobs act at inference only
    fine_tunes: ClassVar[bool] = False
    #: set by ``register_policy``
    registered_name: ClassVar[str]

    def __init__(self, **knobs: Any) -> None:
        self.knobs = {**{p.name: p.default for p in self.options}, **self.check_knobs(knobs)}

    @property
    def name(self) -> str:
        return _name(type(self))

    # -- declarations ---------------------------------------------------------------------------
    @classmethod
    def takes(cls) -> dict[str, Param]:
        """Every knob the gate takes, by name: its params, then its options."""
        return {p.name: p for p in (*cls.params, *cls.options)}

    @classmethod
    def check_knobs(cls, knobs: Mapping[str, Any]) -> dict[str, Any]:
        """``knobs`` checked against the declarations and coerced to their types, in declaration order: every
        param, and the options given. Raises SpaceError with one line naming the gate and the knob."""
        takes, name = cls.takes(), _name(cls)
        for key in knobs:
            if key not in takes:
                raise SpaceError(f"gate {name!r} does not take {key!r} (it takes {', '.join(takes) or 'no knobs'})")
        for p in cls.params:
            if p.name not in knobs:
                raise SpaceError(f"gate {name!r} needs {p.name!r}")
        return {key: p.check(knobs[key], f"gate {name!r}: {key}") for key, p in takes.items() if key in knobs}

    @classmethod
    def example_knobs(cls) -> dict[str, Any]:
        """Legal knobs to build the gate with: one value of each param's default domain (a range's low end)."""
        return {p.name: p.domain(p.default, f"gate {_name(cls)!r}: {p.name}").example() for p in cls.params}

    @classmethod
    def keep_all(cls) -> dict[str, Any]:
        """Knobs under which the converted model, with its gates forced open (``force_open``), computes exactly
        what the dense one does: a norm gate's ε = 0, a trained gate's example knobs. Every gate defines it."""
        raise NotImplementedError

    # -- conversion and training hooks -----------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Convert ``model`` in place and return it."""
        return model

    def loss(self, model: nn.Module, *, output: torch.Tensor | None = None,
             batch: dict | None = None) -> torch.Tensor | None:
        """Extra training loss term after a forward pass (None: nothing to add); ``output`` and ``batch`` are that
        pass's model output and training batch, for terms that depend on the prediction (VA-RED²'s μ0)."""
        return None

    def lr_scales(self, model: nn.Module) -> dict[nn.Parameter, float]:
        """Parameters of ``model`` that train at a multiple of the trial's learning rate (the rest at 1). Adam
        moves a parameter about lr a step whatever its loss weight, so a gate parameter that must travel its whole
        range within a short fine-tuning says so here (the Gumbel gate's weights)."""
        return {}

    def calibrate(self, model: nn.Module, clips: torch.Tensor, *, reset_every: int | None = None) -> dict | None:
        """After training, without gradients: set what the gate takes from data (per-layer thresholds) by streaming
        calibration clips (B, T, 3, H, W); returns what was set, for the record (None: nothing to set)."""
        return None

    def on_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Called at the start of each training epoch (schedules such as warm-ups)."""

    def streams(self, epoch: int, epochs: int) -> bool:
        """Whether this epoch trains frame by frame through the gates (else: frames as one batch)."""
        return self.trains_gates


def force_open(model: nn.Module, value: bool = True) -> nn.Module:
    """Make every gated module of ``model`` keep everything (or, with False, decide again); returns the model.

    A gated module is one with a ``force_open`` attribute; opened, it computes what the dense layer does (the
    equivalence that ``Policy.keep_all`` promises, and the dense twin a benchmark compares against).
    """
    for m in model.modules():
        if hasattr(m, "force_open"):
            m.force_open = value
    return model


class FrameAverages:
    """MacCounter's layer protocol (``density``, ``gate_macs``) as averages over the frames a gated layer
    has streamed; the layer adds to ``frames``, ``density_sum`` and ``gate_macs_sum``."""

    def reset_stats(self) -> None:
        self.frames = 0  # frames seen while streaming (summed over streams)
        self.density_sum = 0.0  # Σ over frames of the fraction of the dense MACs spent
        self.gate_macs_sum = 0.0  # Σ over frames of the gate's own MACs

    @property
    def density(self) -> float:
        return self.density_sum / self.frames if self.frames else 1.0

    @property
    def gate_macs(self) -> float:
        return self.gate_macs_sum / self.frames if self.frames else 0.0


def register_policy(name: str):
    """``@register_policy("input_norm")``: check a Policy subclass's declarations and register it under ``name``."""

    def deco(cls: type[Policy]) -> type[Policy]:
        cls.registered_name = name
        _check_contract(cls)
        return POLICIES.register(name)(cls)

    return deco


def adopt(gates: Mapping[str, type[Policy]]) -> None:
    """Register the gates a process was handed but does not know, under their names.

    A search ships its gates' classes to the Ray workers that run its trials: a built-in gate arrives as a
    reference (unpickling imports its module, which registers it), a gate defined in the driver's own script
    arrives by value and is registered here. A different gate of the same name is an error.
    """
    for name, cls in gates.items():
        if name not in POLICIES:
            register_policy(name)(cls)
        elif POLICIES.get(name) is not cls:
            raise ValueError(f"gate {name!r}: this process registers a different class under that name")


def _name(cls: type) -> str:
    return getattr(cls, "registered_name", cls.__name__)


def _check_contract(cls: type) -> None:
    """The declarations every gate must make, checked at import (a broken gate fails before any search)."""
    from gatesearch.spaces.trial import TrialConfig

    where = f"gate {_name(cls)!r}"
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise TypeError(f"{where}: a gate is a Policy subclass, got {cls!r}")
    if cls.keep_all.__func__ is Policy.keep_all.__func__:
        raise TypeError(f"{where}: defines no keep_all() (the knobs under which it computes the dense network)")
    if not all(isinstance(s, Structure) for s in cls.requires):
        raise TypeError(f"{where}: requires must be a tuple of Structure")
    if not all(isinstance(p, Param) for p in (*cls.params, *cls.options)):
        raise TypeError(f"{where}: params and options must be tuples of Param")
    reserved = set(TrialConfig.shared_fields()) & set(cls.takes())
    if reserved:
        raise TypeError(f"{where}: knob {sorted(reserved)[0]!r} is a parameter every trial has; rename it")
    if len(cls.takes()) != len(cls.params) + len(cls.options):
        raise TypeError(f"{where}: a knob is declared twice")
    for p in cls.options:
        p.check(p.default, f"{where}: option {p.name} default")
    cls.check_knobs(cls.example_knobs())
    cls.check_knobs(cls.keep_all())
