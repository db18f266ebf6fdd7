"""The backbone registry.

Contract: each entry is a builder ``fn(*, width: float = 1.0) -> Backbone``
whose docstring's first line is the description shown by ``gatesearch list``.
"""

from __future__ import annotations

from typing import Callable

from gatesearch.registry import Registry

from .base import Backbone, VideoModel

BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone", __doc__)


def build(name: str, *, task: str, num_classes: int, width: float = 1.0) -> VideoModel:
    """Build the named backbone with the heads of ``task``."""
    backbone = BACKBONES.get(name)(width=width)
    return VideoModel(backbone, task=task, num_classes=num_classes)


def describe(name: str) -> str:
    doc = BACKBONES.get(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
