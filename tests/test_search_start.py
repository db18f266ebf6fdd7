"""Searches that start from trained weights (issue 15), through the CLI with Ray: the dense network trained once and
reused, the user's weights in torchvision layout, a plugin backbone, and bad input refused in one line."""

import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from gatesearch.cli import main
from gatesearch.search.dense import sha256_file

pytestmark = pytest.mark.slow

SEARCH = """
name: start
trials: 1
max_concurrent: 1
{extra}
data: {{train_clips: 8, val_clips: 8, synthetic: {{height: 32, width: 32}}}}
evaluation: {{frames: 4, latency_warmup: 0, latency_repeats: 1, latency_clips: 1}}
space:
  backbone: {backbone}
  gate: input_norm
  threshold: 0.5
  block_size: 2
  clip_length: 4
"""


def write_search(tmp_path, *, backbone="tiny", extra="model: {train: {epochs: 1}}") -> str:
    (tmp_path / "s.yaml").write_text(SEARCH.format(backbone=backbone, extra=extra))
    return "s.yaml"


def search(ray_session, *args):
    r = CliRunner().invoke(main, ["search", *args, "--json", "--ray-address",
                                  ray_session.get_runtime_context().gcs_address])
    assert r.exit_code == 0, r.output
    return r, json.loads(r.stdout.strip().splitlines()[-1])


def exported_weights(trial_id: str, out: str) -> tuple[dict, dict]:
    r = CliRunner().invoke(main, ["export", trial_id, "--out", out])
    assert r.exit_code == 0, r.output
    return load_file(f"{out}/model.safetensors"), json.loads(open(f"{out}/gatesearch.json").read())


def as_dense(gated: dict, dense: dict) -> dict:
    return {k: gated[k] if k in gated else gated[k.removesuffix(".weight") + ".conv.weight"] for k in dense}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_dense_network_is_trained_once_and_reused_and_norm_gates_do_not_train(in_tmp, ray_session):
    config = write_search(in_tmp)
    _, first = search(ray_session, config)
    cache = in_tmp / "gatesearch_runs" / "dense"
    entries = list(cache.iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"model.safetensors", "dense.json"}
    weights = first["dense"]["tiny@1"]["weights"]
    assert weights["trained"] is True and weights["sha256"] == sha256_file(entries[0] / "model.safetensors")

    _, second = search(ray_session, config)  # same backbone, task, data and training: the cache serves it
    again = second["dense"]["tiny@1"]["weights"]
    assert again["trained"] is False and again["sha256"] == weights["sha256"]
    assert list(cache.iterdir()) == entries

    row = second["pareto"][0]
    assert row["gate"] == "input_norm" and row["quality_clips"] == 8 and len(row["quality_drop_ci"]) == 2
    assert row["speedup"] > 0 and "lr" not in row["params"]
    state, meta = exported_weights(row["trial_id"], "model")
    dense = load_file(str(entries[0] / "model.safetensors"))
    assert all(torch.equal(v, dense[k]) for k, v in as_dense(state, dense).items())  # no optimiser step
    assert meta["weights"]["sha256"] == weights["sha256"] and meta["trial"]["epochs"] == 0


def test_search_from_torchvision_layout_weights_with_a_prefix_map(in_tmp, ray_session):
    """A ResNet state dict in torchvision's key layout, its classifier renamed onto the task's head: used as it is
    (no training), recorded by path and hash on the MLflow parent and in the export."""
    from mlflow.tracking import MlflowClient

    from gatesearch.backbones import build

    torch.manual_seed(5)
    model = build("resnet18_tiny", task="classification", num_classes=12)
    torchvision = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torchvision |= {"fc.weight": model.clip_head.fc.weight.detach(), "fc.bias": model.clip_head.fc.bias.detach()}
    torch.save(torchvision, in_tmp / "resnet18_tiny.pth")
    extra = 'model: {weights: resnet18_tiny.pth, prefix_map: {"": "backbone.", "fc.": "clip_head.fc."}}'
    _, summary = search(ray_session, write_search(in_tmp, backbone="resnet18_tiny", extra=extra))
    digest = sha256_file(in_tmp / "resnet18_tiny.pth")
    weights = summary["dense"]["resnet18_tiny@1"]["weights"]
    assert weights["path"] == str(in_tmp / "resnet18_tiny.pth") and weights["sha256"] == digest
    assert not (in_tmp / "gatesearch_runs" / "dense").exists()  # nothing was trained

    client = MlflowClient(summary["tracking_uri"])
    parent = client.search_runs([client.get_experiment_by_name("start").experiment_id],
                                "tags.`gatesearch.kind` = 'search'")[0]
    assert parent.data.tags["gatesearch.weights.resnet18_tiny:1.sha256"] == digest
    state, meta = exported_weights(summary["pareto"][0]["trial_id"], "model")
    assert meta["weights"]["sha256"] == digest
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in as_dense(state, expected).items())


PLUGIN = '''
"""A user's network, registered from outside gatesearch."""
import os

from torch import nn

from gatesearch.backbones import BACKBONES, Backbone

with open({marker!r}, "a") as f:  # which processes imported this plugin
    f.write(f"{{os.getpid()}}\\n")


@BACKBONES.register("plugin_net")
def plugin_net(*, width: float = 1.0):
    """Two strided convs: a user's own per-frame network."""
    return PluginNet(width=width)


class PluginNet(Backbone):
    def __init__(self, *, width: float = 1.0) -> None:
        super().__init__()
        c = max(4, round(8 * width))
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.fine_channels = self.deep_channels = 2 * c

    def fine(self, x):  # (N, 3, H, W) -> (N, 2c, H/4, W/4)
        return self.down(self.stem(x))

    def deep(self, fine):
        return fine
'''


@pytest.fixture
def plugin_file(in_tmp):
    from gatesearch.backbones import BACKBONES

    path = in_tmp / "my_models.py"
    path.write_text(PLUGIN.format(marker=str(in_tmp / "imported_by.txt")))
    yield path
    if "plugin_net" in BACKBONES:  # the driver imported it: leave the registries as they were
        BACKBONES.unregister("plugin_net")
    for name in [m for m in sys.modules if m.startswith("gatesearch_plugin_my_models")]:
        del sys.modules[name]


def forget_plugin():
    """As a new process would be: the plugin not imported."""
    from gatesearch.backbones import BACKBONES

    BACKBONES.unregister("plugin_net")
    for name in [m for m in sys.modules if m.startswith("gatesearch_plugin_my_models")]:
        del sys.modules[name]


def test_search_with_a_plugin_backbone_imported_in_the_driver_and_the_workers(in_tmp, ray_session, plugin_file):
    _, summary = search(ray_session, write_search(in_tmp, backbone="plugin_net"), "--plugin", "my_models.py")
    assert summary["trials_completed"] == 1 and summary["pareto"][0]["params"]["backbone"] == "plugin_net"
    pids = set((in_tmp / "imported_by.txt").read_text().split())
    assert str(os.getpid()) in pids and len(pids) >= 2  # the driver, and the Ray workers that built the model

    trial = summary["pareto"][0]["trial_id"]
    _, meta = exported_weights(trial, "model")
    assert meta["plugins"] == [str(plugin_file)]
    forget_plugin()
    r = CliRunner().invoke(main, ["run", "model", "--frames", "4", "--json"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1
    assert f"needs plugin {plugin_file}" in r.output and "--plugin" in r.output
    r = CliRunner().invoke(main, ["run", "model", "--frames", "4", "--json", "--plugin", str(plugin_file)])
    assert r.exit_code == 0, r.output


def writes(name: str, content):
    """A setup step that writes ``content`` (bytes, text, or a state dict saved by torch) to ``name``."""
    def setup(tmp):
        path = tmp / name
        if isinstance(content, dict):
            torch.save(content, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return setup


BAD = {
    "missing weights": (None, "model: {weights: nowhere.pth}", ["model.weights: nowhere.pth: no such file"]),
    "unreadable weights": (writes("w.pth", b"\x00garbage" * 10), "model: {weights: w.pth}",
                           ["cannot read weights file", "w.pth"]),
    "wrong keys": (writes("w.pth", {"conv1.weight": torch.zeros(16, 3, 7, 7), "layer9.weight": torch.zeros(1)}),
                   "model: {weights: w.pth}",
                   ["w.pth does not match ResNet", "missing", "unexpected 1 key (layer9.weight)"]),
    "missing plugin file": (None, "plugins: [absent.py]", ["plugin absent.py: no such file"]),
    "missing plugin module": (None, "plugins: [no_such_module_here]", ["plugin no_such_module_here: no such module"]),
    "failing plugin": (writes("broken.py", "x = 1\nraise RuntimeError('oops')\n"), "plugins: [broken.py]",
                       ["broken.py failed to import: RuntimeError: oops (broken.py, line 2)"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_weights_and_plugins_are_one_line_before_anything_is_written(in_tmp, case):
    setup, extra, messages = BAD[case]
    if setup:
        setup(in_tmp)
    r = CliRunner().invoke(main, ["search", write_search(in_tmp, backbone="resnet18_tiny", extra=extra)])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
    assert all(m in r.output for m in messages), r.output
    assert not (in_tmp / "gatesearch_runs").exists()
