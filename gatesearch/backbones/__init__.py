"""Backbone families, one module each, registered by name in ``BACKBONES``."""

from . import hrnet, mobilenet, resnet, tiny  # noqa: F401  (registers their entries)
from .base import Backbone, VideoModel
from .registry import BACKBONES, build, describe
from .temporal_shift import clip_length
from .weights import WeightsError, load_weights

__all__ = [
    "BACKBONES", "Backbone", "VideoModel", "WeightsError", "build", "clip_length", "describe", "load_weights",
]
