import os
import sys

import pytest
import torch

for key, value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(key, value)

torch.set_num_threads(2)
sys.stdout.reconfigure(line_buffering=True)  # CI's log shows progress up to the last line even if killed


def pytest_sessionstart(session):
    """Build the C++ kernels once, here, before any test starts worker processes that would each wait for it."""
    from gatesearch.ops import _native

    _native.available()


@pytest.fixture(autouse=True)
def _modules_unpatched():
    """A test that leaves torch.fx's tracing patch on ``nn.Module`` fails itself, not every test after it."""
    from torch import nn

    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    yield
    leaked = nn.Module.__call__ is not call or nn.Module.__getattr__ is not getattr_
    nn.Module.__call__, nn.Module.__getattr__ = call, getattr_
    assert not leaked, "nn.Module left patched by a torch.fx trace"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session; unit tests never start Ray."""
    import ray

    from gatesearch.search.engine import set_env_defaults

    set_env_defaults()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def static_clip():
    """A clip whose background is perfectly still: only the object changes between frames."""
    from gatesearch.data import SyntheticConfig, make_clip

    cfg = SyntheticConfig(height=32, width=32, frames=16, noise=0.0, camera_motion=0.0, seed=3)
    return make_clip(cfg, 5, "test")["clip"][None]  # (1, 16, 3, 32, 32)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """``cli("run", "art", ...)``: the ``gatesearch`` command through click's runner, in a fresh folder."""
    from click.testing import CliRunner

    from gatesearch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, list(args))

    return invoke


# -- helpers shared by test modules (``from conftest import randomize_bn``) ------------------------------------

def randomize_bn(model: torch.nn.Module, clip: torch.Tensor | None = None, *, scale: float = 0.1,
                 seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN affine parameters and statistics, so that eval mode is not the identity transform.

    Weights in [0.5, 1.5), biases and means ~ N(0, scale²), variances in [0.5, 1.5). With a clip (B, T, 3, H, W),
    the running statistics are those of one batched pass over it (then shifted a little): random statistics make
    a deep net's activations grow layer after layer (to 1e8 in HRNet-W32), and float32 rounding at that scale
    would hide the equivalence being tested.
    """
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.data.copy_(torch.randn(m.num_features, generator=g) * scale)
        m.running_mean.copy_(torch.randn(m.num_features, generator=g) * scale)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    if clip is not None:
        from gatesearch.backbones import clip_length

        momenta = [m.momentum for m in bns]
        for m in bns:
            m.momentum = 1.0  # running stats := this batch's stats
        model.train()
        with torch.no_grad(), clip_length(model, clip.shape[1]):
            model(clip)
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
            m.running_mean.add_(torch.randn(m.num_features, generator=g) * scale / 2)
    return model


@pytest.fixture
def quick_crossover(monkeypatch):
    """No timed calibration of the skip and tile kernels' sparse/dense crossover (seconds per layer shape), and no
    disk cache: a fixed crossover of 0.5 sends sparse frames to the sparse kernels and busy ones to the dense path.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("quick_crossover")``."""
    from gatesearch.ops import channel_gather, crossover

    monkeypatch.setenv("GATESEARCH_NO_DISK_CACHE", "1")
    fixed = lambda *a, **k: {"crossover": 0.5, "stable": False}
    monkeypatch.setattr(crossover, "calibrate", fixed)
    monkeypatch.setattr(crossover, "calibrate_plan", fixed)
    monkeypatch.setattr(channel_gather, "calibrate", fixed)
    crossover.clear_cache()
    channel_gather._memo.clear()
    yield
    crossover.clear_cache()
    channel_gather._memo.clear()


def mixed_decisions(model: torch.nn.Module) -> torch.nn.Module:
    """D-STEP policies that switch tiles and channels often: zero logit biases, loud weights."""
    from gatesearch.policies.dstep import dstep_blocks

    with torch.no_grad():
        for b in dstep_blocks(model):
            b.policy.spatial_bias.zero_()
            b.policy.fc2_bias.zero_()
            b.policy.fc2_weight.mul_(40)
            b.policy.spatial_weight.mul_(4)
    return model
