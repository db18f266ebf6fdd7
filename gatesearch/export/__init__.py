"""Exported models: artifact format, loader and the streaming runner."""

from .artifact import (
    Artifact,
    ArtifactError,
    dense_twin,
    load_artifact,
    read_meta,
    save_artifact,
    trial_meta,
    write_files,
)

__all__ = ["Artifact", "ArtifactError", "dense_twin", "load_artifact", "read_meta", "save_artifact", "trial_meta",
           "write_files"]
