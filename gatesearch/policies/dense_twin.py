"""A gated model's dense twin: the network the gate was applied to, with the gated model's weights.

Gates rename what they wrap (a skip-conv keeps its conv as ``<name>.conv``, so
``<name>.weight`` becomes ``<name>.conv.weight``) and add weights of their own.
Rather than spell each gate's renaming out a second time, the map is read off
the conversion itself: ``apply`` moves the dense network's tensors into the
gated layers, so converting a copy and matching tensors by identity gives, for
every gated name, the dense name it came from. The other direction (dense
weights into a gated model) is each gated layer's load hook (``skipconv``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Policy


def dense_names(policy: Policy, dense: nn.Module) -> dict[str, str]:
    """gated state-dict name -> dense state-dict name, for ``policy`` applied to (a copy of) ``dense``."""
    probe = copy.deepcopy(dense)
    name_of = {id(t): name for name, t in probe.state_dict(keep_vars=True).items()}
    policy.apply(probe)
    return {name: name_of[id(t)] for name, t in probe.state_dict(keep_vars=True).items() if id(t) in name_of}


def load_dense_twin(dense: nn.Module, gated_state: dict[str, torch.Tensor], policy: Policy) -> nn.Module:
    """Load the weights of a model gated by ``policy`` into ``dense`` (in place); the gate's own weights are left
    out. Every dense weight must be found: a twin with some fresh weights would compare two different networks."""
    names = dense_names(policy, dense)
    state = {names[k]: v for k, v in gated_state.items() if k in names}
    missing = sorted(set(dense.state_dict()) - set(state))
    if missing:
        raise ValueError(f"the gated weights have no value for {len(missing)} dense weights (e.g. {missing[0]})")
    dense.load_state_dict(state, strict=True)
    return dense
