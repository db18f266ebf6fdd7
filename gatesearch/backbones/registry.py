"""The backbone registry.

Contract: each entry is a builder ``fn(*, width: float = 1.0) -> Backbone``
(per frame) or ``-> ClipBackbone`` (whole clips, 3D convs) whose docstring's
first line is the description shown by ``gatesearch list``.
"""

from __future__ import annotations

from collections.abc import Callable

from gatesearch.registry import Registry

from .base import Backbone, VideoModel
from .clip3d import ClipBackbone, ClipModel

BACKBONES: Registry[Callable[..., Backbone | ClipBackbone]] = Registry("backbone", __doc__)


def build(name: str, *, task: str, num_classes: int, width: float = 1.0) -> VideoModel | ClipModel:
    """Build the named backbone with the heads of ``task``: per-frame backbones in a
    ``VideoModel``, clip-level (3D) backbones in a ``ClipModel``."""
    backbone = BACKBONES.get(name)(width=width)
    if isinstance(backbone, ClipBackbone):
        return ClipModel(backbone, task=task, num_classes=num_classes)
    return VideoModel(backbone, task=task, num_classes=num_classes)
