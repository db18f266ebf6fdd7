"""gatesearch: search the best gated (dynamic) video CNN for a target device.

Importing the package stays cheap: Ray, MLflow and Optuna are imported inside
the functions that need them.
"""

__version__ = "0.1.0"


def load(folder, *, reset_every: int | None = None):
    """An exported model folder (``gatesearch export``) as a stream: ``step(frame)`` -> output, per-frame
    ``density`` and ``macs``, ``reset()``, ``close()``. See ``gatesearch.export.stream.Stream``."""
    from gatesearch.export.stream import load as load_stream

    return load_stream(folder, reset_every=reset_every)
