"""Load user-supplied weights from a local file.

Nothing is ever downloaded: pretrained weights come from a file the user
points at, either safetensors or a PyTorch state dict. PyTorch files are read
with ``torch.load(..., weights_only=True)``, which refuses arbitrary pickled
objects, so a weights file cannot run code.

Every failure is one ``WeightsError`` line naming the file: missing,
unreadable, not a state dict, or not matching the model (with a few of the
offending key names, so the fix — usually a ``prefix_map`` — is obvious).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

_SHOW = 5  # key names shown per kind of mismatch


class WeightsError(ValueError):
    """A weights file that cannot be loaded into the model; the message is one line."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a ``torch.save``-d state dict, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise WeightsError(f"cannot read weights file {path}: {e.strerror or e}") from None
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(head):
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any decoder failure is "unreadable", said in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot read weights file {path}: {reason}") from None
    return _as_state_dict(state, path)


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'."""
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    # common checkpoint wrappers: {"state_dict": {...}} or {"model": {...}}
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"weights file {path} does not hold a state dict (name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"weights file {path} is not a state dict: {_names(bad)} are not tensors")
    return {str(k): v for k, v in obj.items()}


def rename(state: Mapping[str, torch.Tensor], prefix_map: Mapping[str, str | None]) -> dict[str, torch.Tensor]:
    """Rename keys by prefix; the longest matching prefix wins, ``None`` drops the key.

    ``{"fc.": None}`` drops a torchvision classifier; ``{"": "backbone."}`` puts
    backbone weights under a ``VideoModel``; ``{"module.": ""}`` undoes DataParallel.
    """
    prefixes = sorted(prefix_map, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        old = next((p for p in prefixes if key.startswith(p)), None)
        if old is None:
            out[key] = value
        elif prefix_map[old] is not None:
            out[prefix_map[old] + key[len(old):]] = value
    return out


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    prefix_map: Mapping[str, str | None] | None = None,
) -> tuple[list[str], list[str]]:
    """Load a local weights file into ``model`` (a ``VideoModel`` or a ``Backbone``), in place.

    Keys are renamed by ``prefix_map`` first (see ``rename``). Given a
    ``VideoModel`` and a file with no ``backbone.`` keys, the file is taken to
    hold backbone weights only and goes into ``model.backbone`` (heads are task
    specific and stay as they are). Key matching is PyTorch's, so a gated model
    whose layers accept their dense names (``SkipConv2d``) takes dense weights.

    ``strict``: every model key must be in the file and every file key in the
    model; otherwise only the common keys load. Shapes must always match. A
    failed load leaves the model as it was. Returns (missing, unexpected) key names.
    """
    state = read_state_dict(path)
    if prefix_map:
        state = rename(state, prefix_map)
    target = model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module) and not any(k.startswith("backbone.") for k in state):
        target = backbone
    where = f"weights file {path} does not match {type(target).__name__}"
    own = target.state_dict()
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if wrong:
        raise WeightsError(f"{where}: {_shape_error(wrong[0], state[wrong[0]].shape, own[wrong[0]].shape, len(wrong))}")
    # PyTorch matches the keys, so layers that accept other names (a gated conv takes its dense
    # conv's weights) get their say; on any failure the model gets its own values back
    backup = {k: v.detach().clone() for k, v in own.items()}
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a size mismatch under a name a layer renamed
        target.load_state_dict(backup, strict=False)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("size mismatch")]
        raise WeightsError(f"{where}: {lines[0] if lines else str(e).splitlines()[0]}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        target.load_state_dict(backup, strict=False)
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        hint = " (prefix_map renames keys)" if missing and unexpected else ""
        raise WeightsError(f"{where}: {'; '.join(parts)}{hint}")
    if len(unexpected) == len(state):  # no file key was used
        raise WeightsError(f"{where}: no key in common (e.g. file has {_names(unexpected)})")
    return missing, unexpected


def _shape_error(key: str, file_shape, model_shape, count: int) -> str:
    more = f" and {count - 1} more" if count > 1 else ""
    return f"shape of {key} is {tuple(file_shape)} in the file, {tuple(model_shape)} in the model{more}"


def _names(keys: list[str]) -> str:
    # BN step counters say little about what is wrong: show them last
    keys = sorted(keys, key=lambda k: k.endswith("num_batches_tracked"))
    shown = ", ".join(keys[:_SHOW])
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''} ({shown}{more})"


__all__ = ["WeightsError", "load_weights", "read_state_dict", "rename"]
