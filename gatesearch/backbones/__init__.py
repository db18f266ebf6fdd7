"""Backbone families, one module each, registered by name in ``BACKBONES``."""

from . import hrnet, mobilenet, r2plus1d, resnet, resnet3d, tiny  # noqa: F401  (registers their entries)
from .base import Backbone, VideoModel
from .clip3d import ClipBackbone, ClipModel
from .registry import BACKBONES, build, describe
from .temporal_shift import clip_length
from .weights import WeightsError, load_weights

__all__ = [
    "BACKBONES", "Backbone", "ClipBackbone", "ClipModel", "VideoModel", "WeightsError", "build", "clip_length",
    "describe", "load_weights",
]
