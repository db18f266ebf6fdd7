"""The structure a gate converts: declared by the gate (``Policy.requires``), found in a built model.

Gate families need different structure: Skip-Conv gates per-frame ``Conv2d`` layers, D-STEP residual blocks,
VA-RED² the convolutions of a backbone (3D ones in clip nets). A gate declares what it needs; the search space
checks every searched (backbone, gate) pair against the declaration before any trial starts (``spaces.compat``),
and the contract tests check that ``apply`` refuses exactly the models that lack it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Structure:
    """A kind of structure, named as a refusal names it ("gate 'dstep' needs <name>")."""

    name: str
    found: Callable[[nn.Module], bool]  # whether a built dense model has it


def _frame_convs(model: nn.Module) -> bool:
    from gatesearch.backbones import VideoModel

    return isinstance(model, VideoModel) and any(type(m) is nn.Conv2d for m in model.backbone.modules())


def _residual_blocks(model: nn.Module) -> bool:
    from .dstep.block import residual_pairs

    return any(residual_pairs(m) is not None for m in model.modules())


def _backbone_convs(model: nn.Module) -> bool:
    from gatesearch.backbones import ClipModel, VideoModel

    kind = nn.Conv3d if isinstance(model, ClipModel) else nn.Conv2d
    return isinstance(model, (ClipModel, VideoModel)) and any(isinstance(m, kind) for m in model.backbone.modules())


FRAME_CONVS = Structure("per-frame Conv2d layers (a 2D backbone)", _frame_convs)
RESIDUAL_BLOCKS = Structure("residual blocks (conv1/bn1, conv2/bn2 … and a downsample attribute, as in ResNets)",
                            _residual_blocks)
BACKBONE_CONVS = Structure("plain convolutions in its backbone (Conv2d per frame, or Conv3d over clips)",
                           _backbone_convs)
