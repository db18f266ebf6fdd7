"""The contract every gate keeps, as checks that run on one (backbone, gate) pair.

``test_contract.py`` runs them over every registered gate × every backbone it declares it converts
(``Policy.requires``); ``test_toy_gate.py`` runs them on a gate it registers itself. They are plain functions,
as Optuna's ``testing/pytest_samplers.py`` are, so the tests of a gate defined elsewhere can run them too.
Each check builds its models at ``WIDTH`` (full-size layouts keep their depth, lose 3/4 of their channels).
"""

from __future__ import annotations

import copy
import functools

import torch
from conftest import randomize_bn
from torch import nn

from gatesearch.backbones import BACKBONES, build, clip_length
from gatesearch.objectives import MacCounter, dense_macs, task_loss
from gatesearch.policies import POLICIES, build_policy, force_open

K = 12  # classes
WIDTH = 0.25


@functools.cache
def tasks_of(backbone: str) -> tuple[str, ...]:
    return BACKBONES.get(backbone)(width=WIDTH).tasks


@functools.cache
def accepted_gates(backbone: str) -> tuple[str, ...]:
    """The registered gates whose required structure ``backbone`` has (one small build of it)."""
    model = build(backbone, task=tasks_of(backbone)[0], num_classes=K, width=WIDTH)
    return tuple(g for g in POLICIES.list() if all(s.found(model) for s in POLICIES.get(g).requires))


def make_batch(*, clips: int = 2, frames: int = 4, size: int = 64) -> dict[str, torch.Tensor]:
    """Synthetic clips with a still background (so gates have something to skip)."""
    from gatesearch.data import SyntheticConfig, make_clip

    cfg = SyntheticConfig(height=size, width=size, frames=frames, noise=0.0, camera_motion=0.0, seed=3)
    items = [make_clip(cfg, i, "test") for i in range(clips)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def batched(model: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """``model(clip)``, telling clip-aware layers T even before ``VideoModel.forward`` does it itself."""
    with clip_length(model, clip.shape[1]):
        return model(clip)


def expected_shape(task: str, clip: torch.Tensor) -> tuple[int, ...]:
    b, t, _, h, w = clip.shape
    return (b, K) if task == "classification" else (b, t, 1, h // 4, w // 4)


def gated_model(backbone: str, gate: str, task: str, knobs: dict | None = None, *, seed: int = 0) -> nn.Module:
    """``backbone`` converted by ``gate`` (its example knobs unless given), weights seeded."""
    torch.manual_seed(seed)
    model = build(backbone, task=task, num_classes=K, width=WIDTH)
    return build_policy(gate, **(POLICIES.get(gate).example_knobs() if knobs is None else knobs)).apply(model)


def dense_and_opened(backbone: str, gate: str, task: str, clip: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """A dense network with non-trivial BN (eval) and a copy converted with the gate's ``keep_all()`` knobs and
    forced open: the same weights, so the two must compute the same function."""
    dense = randomize_bn(gated_model(backbone, "dense", task), clip).eval()
    opened = build_policy(gate, **POLICIES.get(gate).keep_all()).apply(copy.deepcopy(dense))
    return dense, force_open(opened).eval()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= 1e-4 * scale, f"{what}: differs by {err:.2e} (scale {scale:.1f})"


# -- the checks ---------------------------------------------------------------------------------------

def check_forward(backbone: str, gate: str, batch: dict) -> None:
    """Each supported task, batched and streamed: the head's shape, finite values, and the same seed gives the
    same output."""
    clip = batch["clip"]
    for task in tasks_of(backbone):
        outs = []
        for _ in range(2):
            model = gated_model(backbone, gate, task).eval()
            with torch.no_grad():
                outs.append((batched(model, clip), model.stream(clip)))
        for out, again, how in zip(outs[0], outs[1], ("batched", "streamed")):
            assert out.shape == expected_shape(task, clip), (task, how)
            assert torch.isfinite(out).all(), (task, how)
            assert torch.equal(out, again), f"{task} {how}: same seed, different output"


def check_backward(backbone: str, gate: str, batch: dict) -> None:
    """One training step as the trainer takes it (the last epoch's hooks, the task loss plus the gate's own term
    given the output and the batch) reaches every parameter, finitely."""
    task = tasks_of(backbone)[0]
    model = gated_model(backbone, gate, task).train()
    policy = build_policy(gate, **POLICIES.get(gate).example_knobs())
    policy.on_epoch(model, 1, 2)  # the last epoch of two: gates train by then
    clip = batch["clip"]
    out = model.stream(clip, reset_every=clip.shape[1]) if policy.streams(1, 2) else model(clip)
    loss = task_loss(task, out, batch)
    extra = policy.loss(model, output=out, batch=batch)
    (loss if extra is None else loss + extra).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"no gradient for {no_grad[:5]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad[:5]}"


def check_keep_all(backbone: str, gate: str, batch: dict) -> None:
    """With its ``keep_all()`` knobs and forced open, the converted network is the dense one: streamed frame by
    frame and batched, it gives what the dense network gives on the batch (temporal shifts and clip windows
    included). Eval mode with non-trivial BN statistics."""
    clip = batch["clip"]
    for task in tasks_of(backbone):
        dense, opened = dense_and_opened(backbone, gate, task, clip)
        with torch.inference_mode():
            want = batched(dense, clip)
            assert want.shape == expected_shape(task, clip)
            assert_close(opened.stream(clip), want, f"{task}: streamed")
            assert_close(batched(opened, clip), want, f"{task}: batched")


def check_macs(backbone: str, gate: str, batch: dict) -> None:
    """MAC accounting of the keep-all network on a clip where every pixel changes every frame (so even a gate
    that skips only exact zeros computes everything): fvcore sees the dense network's cost (counted on the dense
    network itself), every gated layer is found in that count and reports density 1, so the effective MACs are
    the dense ones plus the gates' own."""
    clip = torch.rand(batch["clip"][:1].shape, generator=torch.Generator().manual_seed(0))
    frame_shape = tuple(clip.shape[2:])
    dense, opened = dense_and_opened(backbone, gate, tasks_of(backbone)[0], clip)
    counter = MacCounter(opened, frame_shape)
    counter.reset()
    with torch.inference_mode():
        opened.stream(clip)
    report = counter.report()
    want = dense_macs(dense, frame_shape)[0]
    assert want > 0 and report.dense == want
    if POLICIES.get(gate).requires:  # a gate that converts structure reports on the layers it converted
        assert report.layers, f"gate {gate!r} converted {backbone} but no layer reports its density"
    for name, layer in report.layers.items():
        assert layer.dense > 0, f"{name}: a gated layer that fvcore's count of the network does not contain"
        assert layer.density == 1.0, f"{name}: forced open, yet density {layer.density}"
        assert layer.gate >= 0
    assert report.effective >= report.dense


def check_fine_tunes(backbone: str, gate: str, batch: dict) -> None:
    """The gate declares ``fine_tunes`` exactly when it adds parameters of its own: a trial that starts from the
    search's trained dense weights fine-tunes those, and a gate without any does no optimiser step (its knobs act
    at inference)."""
    task = tasks_of(backbone)[0]
    own = sum(p.numel() for p in gated_model(backbone, gate, task).parameters())
    dense = sum(p.numel() for p in gated_model(backbone, "dense", task).parameters())
    assert POLICIES.get(gate).fine_tunes == (own > dense), f"fine_tunes is {POLICIES.get(gate).fine_tunes}, " \
        f"and the gate adds {own - dense} parameters"


def check_export(backbone: str, gate: str, batch: dict, folder) -> None:
    """A trained-looking model (every parameter and BN statistic moved off its seeded init) saved as an artifact
    loads back to the same trial and gives exactly the same stream."""
    from gatesearch.export import load_artifact, save_artifact, trial_meta
    from gatesearch.models import build_model
    from gatesearch.spaces import DataConfig, TrialConfig

    clip = batch["clip"][:1]
    trial = TrialConfig(backbone=backbone, width=WIDTH, task=tasks_of(backbone)[0], gate=gate,
                        knobs=POLICIES.get(gate).example_knobs(), clip_length=clip.shape[1])
    model = randomize_bn(build_model(trial, K))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.eval()
    meta = trial_meta(trial, metrics={}, data=DataConfig(), num_classes=K, frame_shape=tuple(clip.shape[2:]))
    art = load_artifact(save_artifact(folder / "artifact", model, meta))
    assert art.trial == trial
    with torch.inference_mode():
        want = model.stream(clip, reset_every=trial.clip_length)
        assert torch.equal(art.model.stream(clip, reset_every=trial.clip_length), want)
        fresh = build_model(trial, K).eval().stream(clip, reset_every=trial.clip_length)
    assert not torch.equal(fresh, want), "the weights do not change the output, so the round trip proves nothing"
