"""A trial's model as an MLflow logged model that loads without running or unpickling anything from the store.

The MLflow model folder holds the gatesearch artifact (``model.safetensors`` + ``gatesearch.json``) under
``data/`` and an ``MLmodel`` file with two flavors: ``gatesearch`` (the artifact format) and
``python_function``, whose loader is this module of the installed package. ``mlflow.pyfunc.load_model`` imports
it and calls ``_load_pyfunc(data/)``, which rebuilds the network from the JSON and the safetensors weights.
(MLflow's models-from-code would execute a Python file stored with the model, and the default
``PythonModel`` flavor unpickles one; neither is needed here.)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

FLAVOR = "gatesearch"
DATA = "data"  # the artifact folder inside the MLflow model folder
LOADER = __name__


def artifact_folder(model_dir: Path) -> Path:
    """The gatesearch artifact inside a downloaded MLflow model folder."""
    return Path(model_dir) / DATA


def save_model(path: Path, files: Path) -> None:
    """Write an MLflow model folder at ``path`` (which must not exist) around the artifact folder ``files``."""
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model
    from mlflow.utils.environment import _PythonEnv

    from gatesearch import __version__

    from .artifact import FORMAT, read_meta

    read_meta(files)  # refuses anything that is not a complete artifact
    path = Path(path)
    shutil.copytree(files, path / DATA)
    model = Model()
    model.add_flavor(FLAVOR, format=FORMAT, data=DATA, gatesearch_version=__version__)
    add_to_model(model, loader_module=LOADER, data=DATA, python_env="python_env.yaml")
    model.save(str(path / "MLmodel"))
    (path / "requirements.txt").write_text("\n".join(_requirements()) + "\n")
    _PythonEnv(python=".".join(map(str, sys.version_info[:3])), build_dependencies=["pip"],
               dependencies=["-r requirements.txt"]).to_yaml(str(path / "python_env.yaml"))


def _requirements() -> list[str]:
    """What loading the model needs, pinned to what wrote it."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("gatesearch", "torch", "safetensors", "fvcore", "numpy"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


class PyfuncModel:
    """``predict(frames)`` over a clip: frames (T, H, W, 3) uint8 or (T, 3, H, W) float in [0, 1], run through a
    fresh ``Stream``; returns per-frame ``density`` and ``macs``, the stream's summary and the last output."""

    def __init__(self, artifact) -> None:
        self.artifact = artifact

    def predict(self, model_input: Any, params: dict | None = None) -> dict[str, Any]:
        import numpy as np

        from .stream import Stream

        reset_every = (params or {}).get("reset_every")
        with Stream(self.artifact, reset_every=reset_every) as stream:
            outputs = [stream.step(frame) for frame in model_input]
            outputs.append(stream.flush())
            last = next((y for y in reversed(outputs) if y is not None), None)
            return {
                "density": np.array([s.density for s in stream.stats]),
                "macs": np.array([s.macs for s in stream.stats]),
                "output": None if last is None else last.numpy(),
                **stream.summary(),
            }


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> PyfuncModel:
    """MLflow's entry point for ``python_function`` models: the artifact folder, loaded from safetensors."""
    from .artifact import load_artifact

    return PyfuncModel(load_artifact(Path(data_path)))


__all__ = ["DATA", "FLAVOR", "PyfuncModel", "artifact_folder", "save_model"]
