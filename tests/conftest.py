import os

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
