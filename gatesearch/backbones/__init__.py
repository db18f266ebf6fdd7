"""Backbone families, one module each, registered by name in ``BACKBONES``."""

from . import tiny  # noqa: F401  (registers its entries)
from .base import Backbone, VideoModel
from .registry import BACKBONES, build, describe

__all__ = ["BACKBONES", "Backbone", "VideoModel", "build", "describe"]
