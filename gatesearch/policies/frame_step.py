"""A gated model's streamed frame run natively, from a plan of its layers (issue 18).

Skip-Convolutions (Eq. 3) make a frame's work proportional to what changed,
but run layer by layer from Python a gated frame also pays a fixed cost per
layer (module calls, a gate call, a step call, change maps, stream-layer
bookkeeping) that does not shrink with density: on small layers it is larger
than the skipped work, and a gated tiny net ran slower than its dense twin.

``FrameStep`` traces ``VideoModel.frame_layers`` once (torch.fx), turns the
skip-convs (norm gates, either reference mode, eval BN folded), ReLU / ReLU6,
residual adds, max-pools, nearest upsampling, D-STEP blocks (one step each:
``dstep.plan``) and the plain convs between them (eval BN folded) into one
``FramePlan`` (csrc/frame.cpp) and runs each streamed frame as one native call; whatever follows that it does not
know (a clip head's pooling) runs in Python on the plan's outputs. The plan
uses the per-layer path's kernels and arithmetic, so outputs and densities
match it. It steps aside (``frame`` then runs the layers) while training,
with autograd recording, off fp32 CPU, while a forward hook waits on a
module it runs (calibration probes layers so), when a layer's path is not
"auto", or for models it cannot trace or plan.
"""

from __future__ import annotations

import inspect
import math
import operator
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from gatesearch.backbones.base import Add, contiguous, frame_pool

from .skipconv import FoldedBatchNorm2d, SkipConv2d, skip_layers

#: residual against the previous frame (Eq. 3) / against each block's reference (csrc/frame.h: Reference)
REFERENCE_MODES = {"frame": 0, "block": 1}
_INF = math.inf
_F32 = torch.float32
_FUSED = object()  # a node planned together with its only user
_NOT_CONSTANT = object()
_TRACING = threading.Lock()  # torch.fx patches ``nn.Module`` for the whole process while it traces


class _Tracer(fx.Tracer):
    """Stops at layers the plan maps one to one (and at anything stateful), traces through the rest.

    torch.fx routes every module call and attribute read in the process through the tracer while it traces:
    two traces at once (stream threads, each planning its copy) can leave ``nn.Module.__call__`` patched for
    good, and a model running in another thread meanwhile would be traced into this graph. So traces take turns,
    and calls from other threads pass straight through.
    """

    LEAVES = (SkipConv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool2d, Add, nn.Identity,
              nn.Dropout)

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(contiguous,))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.LEAVES) or hasattr(m, "reset_state") or super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        with _TRACING:
            self._thread = threading.get_ident()
            return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:  # a slice of a Sequential (``features[:4]``): traced through, its layers are submodules
            if isinstance(mod, nn.Sequential):
                return "<slice>"
            raise


class _Frame(nn.Module):
    """What the tracer traces: the model's ``frame_layers``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.frame_layers(x)


@dataclass
class _ConvStats:
    """Where a planned conv's per-frame statistics go (the layer's ``FrameAverages``)."""

    layer: SkipConv2d
    out_hw: tuple[int, int]
    gate_macs: float
    state: dict = field(init=False)  # the layer's __dict__: its plain-number statistics, updated every frame
    per_position: float = field(init=False)  # 1 / output positions: recomputed rows -> density
    computed: tuple | None = field(init=False, default=None)  # the layer's ``_computed`` on a residual frame

    def __post_init__(self) -> None:
        self.state = self.layer.__dict__
        self.per_position = 1.0 / (self.out_hw[0] * self.out_hw[1])


@dataclass
class _Program:
    """A built plan and what surrounds it: the traced graph's outputs, its Python tail, the stats to record."""

    plan: object  # the extension's FramePlan
    step_names: list[str]  # the graph node each of its steps computes
    in_shape: tuple[int, ...]
    signature: tuple
    outputs: list[int]  # plan slots handed back to Python
    output_nodes: list[fx.Node]
    tail: list  # (node, callable(env) -> value) run in Python after the plan
    result: object  # the graph output's argument (nodes inside)
    stats: list[_ConvStats] = field(default_factory=list)
    dsteps: list = field(default_factory=list)  # dstep.plan.BlockStats of the planned D-STEP blocks
    modules: list[nn.Module] = field(default_factory=list)  # the modules the plan runs in their place
    constants: dict = field(default_factory=dict)  # nodes fixed by the frame shape (``x.shape[-2:]``), by value

    hook_dicts: list = field(init=False)  # the modules' hook registries (registering a hook fills them in place)
    direct: int | None = field(init=False)  # the output that is the frame's result, when no Python runs after

    def __post_init__(self) -> None:
        self.hook_dicts = [d for m in self.modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        plain = not self.tail and isinstance(self.result, fx.Node) and self.result in self.output_nodes
        self.direct = self.output_nodes.index(self.result) if plain else None

    def hooked(self) -> bool:
        """Whether a forward hook waits on a module the plan would not call (calibration probes a layer so)."""
        return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                    or any(self.hook_dicts))


class _Steps:
    """The plan being built, naming each step after the graph node it came from (for profiles)."""

    def __init__(self, plan) -> None:
        self.plan, self.node, self.names = plan, "", []

    def __getattr__(self, name: str):
        add = getattr(self.plan, name)

        def named(*args):
            self.names.append(self.node)
            return add(*args)

        return named


class FrameStep:
    """``VideoModel.frame_runner`` of a Skip-Conv model: one native call per streamed frame (see the module doc)."""

    def __init__(self) -> None:
        self._graph: fx.Graph | None = None
        self._root: nn.Module | None = None
        self._program: _Program | None = None
        self._failed: str | None = None  # why this model cannot be traced (kept: no retry per frame)
        self._unplannable: tuple | None = None  # the layers' signature the last build refused
        self._layers: list[SkipConv2d] | None = None
        self._resets = -1  # the anchor layer's reset count at the last planned frame

    def __deepcopy__(self, memo) -> FrameStep:
        return FrameStep()  # plans hold the original's tensors; a copy plans its own model

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        program = self._program
        if program is not None:  # the steady state, checked first and cheaply: it runs every frame of a clip
            anchor = self._layers[0]
            if (anchor.resets == self._resets and anchor.streaming and not anchor.training
                    and not torch.is_grad_enabled() and x.shape == program.in_shape and x.dtype is _F32 and x.is_cpu
                    and not program.hooked()):
                return self._run(program, x, False)
        if self._layers is None:
            self._layers = _anchors(model)
        layers = self._layers
        if not layers or self._failed:
            return None
        anchor = layers[0]
        if not (anchor.streaming and not anchor.training and not torch.is_grad_enabled()
                and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 4):
            self._resets = -1  # the layers run this frame: the plan starts again from a reference frame
            return None
        reference = anchor.resets != self._resets or self._program is None or self._program.in_shape != x.shape
        if reference:
            program = self._prepare(model, x)
            if program is None:
                return None
            self._resets = anchor.resets
        program = self._program
        if program.hooked():
            self._resets = -1
            return None
        return self._run(program, x, reference)

    def _run(self, program: _Program, x: torch.Tensor, reference: bool) -> torch.Tensor:
        outs = program.plan.run(x, reference, program.outputs)
        self._record(program, x.shape[0])
        if program.direct is not None:
            return outs[program.direct]
        env = dict(program.constants)
        env.update(zip(program.output_nodes, outs))
        for node, fn in program.tail:
            env[node] = fn(env)
        return fx.node.map_arg(program.result, env.__getitem__)

    # -- building ----------------------------------------------------------
    def _prepare(self, model: nn.Module, x: torch.Tensor) -> _Program | None:
        """The plan for this model and frame shape, rebuilt when a layer's weights, gate or path changed."""
        from gatesearch.ops import _native

        if _native.module() is None:
            return None
        if self._graph is None:
            try:
                self._root = _Frame(model)
                self._graph = _Tracer().trace(self._root)
            except Exception as exc:  # control flow or ops fx cannot follow: the layers run
                self._failed = f"trace: {exc}"
                return None
        signature = (tuple(x.shape), *(_signature(layer) for layer in self._layers), *_outside_signature(model))
        if self._program is None or self._program.signature != signature:
            self._program = None
            if signature == self._unplannable:
                return None
            try:
                self._program = _build(self._root, self._graph, tuple(x.shape), signature)
            except _Unplannable:
                self._unplannable = signature
        return self._program

    @staticmethod
    def _record(program: _Program, n: int) -> None:
        """What ``SkipConv2d._record`` adds per frame: densities (1 on a reference frame) and gate MACs, and the
        block mask ``computed_positions`` draws (the plan's own, updated in place frame by frame: fetched once)."""
        stats = program.stats
        rows = program.plan.rows()
        if stats and rows[0] >= 0 and stats[0].computed is None:
            for stat, mask in zip(stats, program.plan.masks()):
                stat.computed = (mask, (n, *stat.out_hw))
        for stat, r in zip(stats, rows):
            d = stat.state
            d["frames"] += n
            if r < 0:
                d["density_sum"] += float(n)
                d["_computed"] = (None, (n, *stat.out_hw))
            else:
                d["density_sum"] += r * stat.per_position
                d["gate_macs_sum"] += stat.gate_macs * n
                d["_computed"] = stat.computed
        if program.dsteps:
            from .dstep.plan import record

            record(program.dsteps, program.plan.dstep_stats())


class _Unplannable(Exception):
    """The model holds a layer the plan cannot run where it matters; the layers run instead."""


def _anchors(model: nn.Module) -> list:
    """The gated layers whose streaming state the plan follows: skip-convs, else D-STEP blocks."""
    from .dstep.block import dstep_blocks

    return skip_layers(model) or dstep_blocks(model)


def _outside_signature(model: nn.Module) -> tuple:
    """The weights and statistics outside the D-STEP blocks: the plan folds the plain convs and BNs it meets (those
    between D-STEP blocks, or a conv a Skip-Conv policy left ungated), so their updates must rebuild it too."""
    from .dstep.plan import outside_signature

    return (outside_signature(model),)


def _signature(layer) -> tuple:
    """Changes whenever the plan of this layer would: weights, BN, gate knobs, block size, mode, path."""
    from gatesearch.affine import versions

    if not isinstance(layer, SkipConv2d):  # a D-STEP block
        from .dstep.plan import signature

        return signature(layer)
    c = layer.conv
    gate = layer.gate
    params = list(gate.parameters())
    knobs = (tuple(sorted(vars(gate).items())) if not params
             else ("learned", versions(*params), getattr(gate, "force_open", None), gate.training))
    bn = layer.bn
    bn_key = () if bn is None else versions(bn.weight, bn.bias, bn.running_mean, bn.running_var) + (bn.training,)
    return (id(layer), type(gate), knobs, layer.block_size, layer.reference, layer.path,
            versions(c.weight, c.bias), bn_key, layer.training)


def _build(root: nn.Module, graph: fx.Graph, in_shape: tuple[int, ...], signature: tuple) -> _Program:
    from gatesearch.ops import _native

    plan = _Steps(_native.module().FramePlan())
    plan.dsteps = []
    slot: dict[fx.Node, int] = {}  # nodes the plan computes -> their slot
    shape: dict[fx.Node, tuple[int, ...]] = {}
    folded: dict[fx.Node, SkipConv2d] = {}  # conv nodes whose BN rides in their weights
    stats: list[_ConvStats] = []
    fused: dict[fx.Node, tuple] = {}  # ReLU node -> its (slot, shape), planned with the residual add it alone reads
    tail = []
    result = None
    constants: dict[fx.Node, object] = {}  # shapes of planned tensors and what is read off them

    def native(*nodes) -> bool:  # 4-D tensors a step computes (the head pool's 2-D rows are for Python only)
        return all(isinstance(n, fx.Node) and n in slot and len(shape[n]) == 4 for n in nodes)

    for node in graph.nodes:
        if node.op == "placeholder":
            slot[node], shape[node] = 0, in_shape
            continue
        if node.op == "output":
            result = node.args[0]
            continue
        value = _constant(node, shape, constants)
        if value is not _NOT_CONSTANT:
            constants[node] = value
            continue
        plan.node = node.name
        planned = fused.pop(node, None) or _plan_node(plan, root, node, slot, shape, folded, stats, fused, native,
                                                      constants)
        if planned is _FUSED:
            continue
        if planned is None:
            tail.append((node, _python_step(root, node)))
        else:
            slot[node], shape[node] = planned
    read = [n for node, _ in tail for n in node.all_input_nodes] + _nodes(result)
    used = [n for n in slot if n in read]  # what Python reads of the plan: the tail's inputs and the result
    if not stats and not plan.dsteps:
        raise _Unplannable("no gated layer runs in the plan")
    in_python = {node for node, _ in tail}
    modules = [root.get_submodule(n.target) for n in graph.nodes if n.op == "call_module" and n not in in_python]
    return _Program(plan=plan.plan, step_names=plan.names, in_shape=in_shape, signature=signature,
                    outputs=[slot[n] for n in used], output_nodes=used, tail=tail, result=result, stats=stats,
                    modules=modules, constants=constants, dsteps=plan.dsteps)


def _constant(node: fx.Node, shape: dict, constants: dict):
    """A value the frame shape fixes (``x.shape``, ``x.size(d)``, an index into either), or ``_NOT_CONSTANT``."""
    args = node.args
    if node.op == "call_function" and node.target is getattr and len(args) == 2 and args[1] == "shape":
        if isinstance(args[0], fx.Node) and args[0] in shape:
            return torch.Size(shape[args[0]])
    if node.op == "call_method" and node.target == "size" and not node.kwargs:
        if isinstance(args[0], fx.Node) and args[0] in shape:
            size = torch.Size(shape[args[0]])
            return size if len(args) == 1 else size[args[1]]
    if node.op == "call_function" and node.target is operator.getitem and len(args) == 2:
        if isinstance(args[0], fx.Node) and args[0] in constants and not isinstance(args[1], fx.Node):
            return constants[args[0]][args[1]]
    return _NOT_CONSTANT


def _nodes(arg) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


def _kind(root: nn.Module, node: fx.Node) -> str | None:
    """What a node computes, in the plan's terms (None: nothing the plan runs)."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if isinstance(m, SkipConv2d):
            return "conv"
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            return "clamp"
        if isinstance(m, Add):
            return "add"
        if isinstance(m, nn.MaxPool2d):
            return "max_pool"
        if isinstance(m, FoldedBatchNorm2d):
            return "folded_bn"
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return "identity"
        if type(m) is nn.Conv2d:
            return "dense_conv"
        from .dstep.block import DStepBlock

        if isinstance(m, DStepBlock):
            return "dstep"
        return None
    if node.op == "call_function":
        if node.target in (operator.add, torch.add) and len(node.args) == 2 and not node.kwargs:
            return "add"
        if node.target in (F.relu, torch.relu) and not node.kwargs:
            return "relu"
        if node.target is contiguous:
            return "identity"
        if node.target is F.interpolate:
            return "upsample"
        if node.target is frame_pool:
            return "head_pool"
    if node.op == "call_method":
        if node.target == "contiguous":
            return "identity"
        if node.target == "relu":
            return "relu"
    return None


def _plan_node(plan, root, node, slot, shape, folded, stats, fused, native, constants):
    """Add the node's step to the plan; returns (slot, shape), or None when the node runs in Python."""
    kind = _kind(root, node)
    if kind is None:
        return None
    args = node.args
    if kind in ("identity", "folded_bn"):
        src = args[0]
        if not native(src):
            return None
        if kind == "folded_bn":
            bn = root.get_submodule(node.target)
            if folded.get(src) is None or folded[src].bn is not bn:
                return None  # a BN the conv before it does not carry: the plan has no BN step
        return slot[src], shape[src]
    if kind == "conv":
        return _plan_conv(plan, root.get_submodule(node.target), node, slot, shape, folded, stats, native)
    if kind in ("relu", "clamp"):
        src = args[0]
        if not native(src):
            return None
        lo, hi = 0.0, _INF
        if kind == "clamp":
            m = root.get_submodule(node.target)
            lo, hi = float(m.min_val), float(m.max_val)
        return plan.clamp(slot[src], -1, lo, hi), shape[src]
    if kind == "add":
        a, b = args[:2]
        if not native(a, b) or shape[a] != shape[b]:
            return None
        (user,) = node.users if len(node.users) == 1 else (None,)
        if user is not None and _kind(root, user) == "relu":  # relu(a + b), one step: the sum is read by no one else
            fused[user] = plan.clamp(slot[a], slot[b], 0.0, _INF), shape[a]
            return _FUSED
        return plan.clamp(slot[a], slot[b], -_INF, _INF), shape[a]
    if kind == "max_pool":
        m = root.get_submodule(node.target)
        k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
        src = args[0]
        if not native(src) or d != (1, 1) or m.ceil_mode or m.return_indices:
            return None
        n, c, h, w = shape[src]
        out = (n, c, (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1)
        return plan.max_pool(slot[src], list(k), list(s), list(p)), out
    if kind == "upsample":
        return _plan_upsample(plan, node, slot, shape, native, constants)
    if kind == "head_pool":
        if len(args) != 2 or node.kwargs or not native(args[0]) or type(args[1]) is not int or args[1] < 1:
            return None
        src, grid = args
        n, c = shape[src][:2]
        return plan.head_pool(slot[src], grid), (n, c * grid * grid + c)
    if kind == "dense_conv":
        return _plan_dense_conv(plan, root, node, slot, shape, fused, native)
    if kind == "dstep":
        from .dstep.plan import plan_block

        src = args[0]
        if not native(src) or len(args) != 1 or node.kwargs:
            return None
        planned = plan_block(plan, root.get_submodule(node.target), slot[src], shape[src])
        if planned is None:
            return None
        out, out_shape, block_stats = planned
        plan.dsteps.append(block_stats)
        return out, out_shape
    return None


def _plan_dense_conv(plan, root, node, slot, shape, fused, native):
    """A plain conv (D-STEP leaves the convs outside its blocks dense), with the eval BN that alone reads it."""
    from gatesearch.ops.channel_gather import FoldedConv

    m = root.get_submodule(node.target)
    src = node.args[0]
    if not native(src) or len(node.args) != 1 or node.kwargs or m.padding_mode != "zeros" or isinstance(m.padding,
                                                                                                         str):
        return None
    (user,) = node.users if len(node.users) == 1 else (None,)
    bn = root.get_submodule(user.target) if user is not None and user.op == "call_module" else None
    if not (type(bn) is nn.BatchNorm2d and not bn.training and user.args == (node,) and not user.kwargs):
        bn = None
    if bn is not None:
        f = FoldedConv.fold(m, bn)
        weight, bias = f.weight, f.bias
    else:
        weight, bias = m.weight.detach(), None if m.bias is None else m.bias.detach()
    out = plan.dense_conv(slot[src], weight, bias, [*m.stride, *m.padding, *m.dilation, m.groups])
    planned = out, (shape[src][0], m.out_channels, *_conv_out_hw(shape[src], m))
    if bn is not None:  # the BN node takes the conv's slot; the conv itself has no other reader
        fused[user] = planned
        return _FUSED
    return planned


def _conv_out_hw(in_shape: tuple[int, ...], conv: nn.Conv2d) -> tuple[int, int]:
    """A conv's output size for an (N, C, H, W) input."""
    from gatesearch.ops.geometry import conv_out_size

    return tuple(conv_out_size(n, k, s, p, d) for n, k, s, p, d in
                 zip(in_shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation))


def _plan_upsample(plan, node, slot, shape, native, constants):
    """``F.interpolate(mode="nearest")`` (HRNet's fusion), as index tables PyTorch's own nearest rule gives."""
    try:
        bound = inspect.signature(F.interpolate).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    kwargs = dict(fx.node.map_arg(dict(bound.arguments), lambda n: constants.get(n, n)))
    src = kwargs.pop("input")
    if not native(src) or kwargs.get("mode", "nearest") != "nearest" or kwargs.get("antialias"):
        return None
    if any(isinstance(v, fx.Node) for v in _nodes(kwargs)) or len(shape[src]) != 4:
        return None
    n, c, h, w = shape[src]
    index = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)  # exact: each output names its source
    try:
        picked = F.interpolate(index, **kwargs)[0, 0].to(torch.int64)
    except (TypeError, ValueError, RuntimeError):
        return None
    iy, ix = picked[:, 0] // w, picked[0] % w
    if not torch.equal(picked, iy[:, None] * w + ix[None, :]):
        return None  # not separable by rows and columns: the plan's step cannot express it
    out = plan.upsample(slot[src], iy.tolist(), ix.tolist(), h, w)
    return out, (n, c, int(iy.numel()), int(ix.numel()))


def _plan_conv(plan, layer: SkipConv2d, node, slot, shape, folded, stats, native):
    """A skip-conv with a norm gate (either reference mode) or a Gumbel gate (frame reference), eval BN folded in."""
    from gatesearch import ops
    from gatesearch.ops.crossover import plan_crossover
    from gatesearch.ops.packing import kernel_kind, onednn_weight, packed_weight

    from .gumbel import GumbelGate
    from .norm_gates import NormGate

    src = node.args[0]
    gate = layer.gate
    gumbel = isinstance(gate, GumbelGate)
    if gumbel and (gate.force_open or gate.training or layer.reference != "frame"):
        return None  # forced open / training / block references: the per-layer path's generic gate
    if not native(src) or not (gumbel or isinstance(gate, NormGate)) or layer.path not in ("auto", "sparse"):
        return None
    c = layer.conv
    if layer.bn is not None:
        weight, bias = layer.folded_params()
        folded[node] = layer
    else:
        weight, bias = c.weight.detach(), None if c.bias is None else c.bias.detach()
    in_shape = shape[src]
    geom = ops.resolve_geometry(in_shape, weight.shape, stride=c.stride, padding=c.padding, dilation=c.dilation,
                                groups=c.groups, block_size=layer.block_size)
    kind = kernel_kind(in_per_group=geom.in_channels // geom.groups)
    args = {"threshold": 0.0, "scale": 1.0} if gumbel else gate._args(layer)
    positions = in_shape[0] * geom.out_hw[0] * geom.out_hw[1]
    max_rows = positions if layer.path == "sparse" else int(plan_crossover(geom) * positions)
    out = plan.conv(slot[src], geom.ints(), int(kind), REFERENCE_MODES[layer.reference],
                    packed_weight(weight, kind, geom.groups), onednn_weight(weight, kind, geom.groups), weight, bias,
                    float(args["threshold"]), float(args["scale"]), max_rows)
    if gumbel:  # f > 0 on |r| (Eq. 8), with GumbelGate.plan's packed weight and bias, so the same decisions
        wpack = gate.weight.detach()[0].permute(1, 2, 0).reshape(-1, c.in_channels).contiguous()
        plan.plan.gumbel_gate(wpack, float(gate.bias.detach() * gate.settings.bias_gain))
    stats.append(_ConvStats(layer=layer, out_hw=tuple(geom.out_hw),
                            gate_macs=layer.gate.macs(layer, in_shape[2:], geom.out_hw)))
    return out, (in_shape[0], geom.out_channels, *geom.out_hw)


def _python_step(root: nn.Module, node: fx.Node):
    """The node as Python runs it, reading its inputs from the frame's environment."""
    if node.op == "call_module":
        fn = root.get_submodule(node.target)
    elif node.op == "call_function":
        fn = node.target
    elif node.op == "call_method":
        name = node.target

        def fn(obj, *rest, **kw):
            return getattr(obj, name)(*rest, **kw)
    elif node.op == "get_attr":
        value = _get_attr(root, node.target)
        return lambda env: value
    else:
        raise _Unplannable(f"node {node.op} {node.target}")

    def run(env):
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        return fn(*args, **kwargs)

    return run


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def install(model: nn.Module) -> None:
    """Give a Skip-Conv model a ``FrameStep`` (models without ``frame_layers`` keep running layer by layer)."""
    if hasattr(model, "frame_layers"):
        model.frame_runner = FrameStep()
