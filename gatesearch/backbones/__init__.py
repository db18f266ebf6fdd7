"""Backbone families, one module each, registered by name in ``BACKBONES``.

Backbones hold no gate code, but they are written so that gates can convert them in place, and that is their
side of the contract with ``policies``:

- every convolution is its own ``nn.Conv2d`` (per-frame nets) or ``nn.Conv3d`` (clip nets) module followed by
  its ``BatchNorm``, so a gate can swap the conv and fold the BN (Skip-Conv, VA-RED²);
- activations and max-pools are modules (``nn.ReLU``, ``nn.MaxPool2d``) and the ResNet blocks join with a
  ``base.Add`` module, so a gated stream can swap them for versions that redo only what changed
  (``policies.stream_ops``); a join written ``a + b`` (MobileNetV2, HRNet's fusion) is recomputed in full;
- residual blocks follow torchvision's naming: ``conv1``/``bn1``, ``conv2``/``bn2`` (…) and ``downsample``, the
  protocol D-STEP gates (``policies.structure.RESIDUAL_BLOCKS``);
- per-frame nets split into ``fine`` (stride 4) and ``deep``, so a heatmap model never runs the deep stages.

Every module of this package is imported when the package is, so a new family is one new file.
"""

from gatesearch.registry import import_submodules

from .base import Backbone, VideoModel
from .clip3d import ClipBackbone, ClipModel
from .registry import BACKBONES, build
from .temporal_shift import clip_length
from .weights import WeightsError, load_weights

import_submodules(__name__, __path__)

__all__ = [
    "BACKBONES", "Backbone", "ClipBackbone", "ClipModel", "VideoModel", "WeightsError", "build", "clip_length",
    "load_weights",
]
