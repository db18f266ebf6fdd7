"""Build-once, load-once access to the C++ kernels in csrc/ (one file per concept; kernels.h is what they share).

Why JIT: ``pip install -e .`` stays pure Python; the first use compiles the
kernels with the machine's own compiler (``-march=native``; ~15 s on 2 cores) into a
cache directory keyed by the source, the torch version and the CPU, and later
processes just load the shared library. When anything fails (no compiler,
read-only cache, ``GATESEARCH_NATIVE=0``), every caller falls back to the
plain-PyTorch kernels, which compute the same result.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = sorted(_CSRC.glob("*.cpp"))
_HEADERS = sorted(_CSRC.glob("*.h"))
_NAMESPACE = "gatesearch_skipconv"
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_module = None  # the built extension module (its Python classes: FramePlan)
_disabled_depth = 0  # > 0 inside ``disabled()``


def cache_root() -> Path:
    """``$GATESEARCH_CACHE_DIR`` or ``~/.cache/gatesearch``."""
    env = os.environ.get("GATESEARCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "gatesearch"


def _cpu_tag() -> str:
    """Model name and ISA flags: a -march=native build must not move to another CPU."""
    info = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    return info or platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def machine_tag() -> str:
    """Short digest of the CPU model and ISA flags."""
    return hashlib.sha1(_cpu_tag().encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=1)
def build_tag() -> str:
    """Digest of the kernel source and its path, torch version and CPU: names the build and keys timing caches."""
    key = hashlib.sha1()
    # The checkout's path too: torch's build.ninja names sources by absolute path, so two checkouts of the same
    # source sharing one folder would rebuild it for each other, minutes at a time.
    for part in (*(src.read_bytes() for src in (*_SOURCES, *_HEADERS)), torch.__version__.encode(),
                 _cpu_tag().encode(), str(_CSRC.resolve()).encode()):
        key.update(part)
    return key.hexdigest()[:12]


def _build_dir() -> tuple[str, Path]:
    digest = build_tag()
    for root in (cache_root(), Path(tempfile.gettempdir()) / "gatesearch-cache"):
        path = root / "ext" / digest
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return f"gatesearch_skipconv_{digest}", path
    raise OSError("no writable cache directory for the C++ kernels")


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One process builds or loads at a time, under a lock the kernel drops when its holder dies.

    torch's own build lock is a file that only its creator removes: a process killed mid-build (a stopped
    Ray worker, a Ctrl-C) leaves it behind, and every later process waits on it forever. Holding this
    ``flock`` means no live process is building, so a leftover ``lock`` file is stale and goes.
    """
    with open(build_dir / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load() -> bool:
    global _module
    if os.environ.get("GATESEARCH_NATIVE", "1") == "0":
        return False
    if hasattr(torch.ops, _NAMESPACE) and hasattr(getattr(torch.ops, _NAMESPACE), "gate_block_mask"):
        # already registered in this process (e.g. importlib.reload): its module, if it is this build
        _module = sys.modules.get(f"gatesearch_skipconv_{build_tag()}")
        return True
    try:
        from torch.utils import cpp_extension

        name, build_dir = _build_dir()
        with _build_lock(build_dir):
            _module = cpp_extension.load(
                name=name,
                sources=[str(src) for src in _SOURCES],
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=True,
                verbose=False,
            )
        return True
    except Exception as exc:  # any build or load failure: use the PyTorch kernels
        warnings.warn(f"gatesearch.ops: C++ kernels unavailable, using PyTorch fallback ({exc})", stacklevel=3)
        return False


def available() -> bool:
    """Whether the C++ kernels are loaded (builds them on the first call)."""
    global _loaded
    if _disabled_depth:
        return False
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded


def usable(*tensors: torch.Tensor) -> bool:
    """C++ kernels apply: loaded, fp32 CPU inputs, no autograd to record."""
    return available() and cpu_fp32_inference(*tensors)


def cpu_fp32_inference(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors and no autograd to record: what the gather kernels (C++ or PyTorch) handle."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return True


def ops():
    """The registered operator namespace (``torch.ops.gatesearch_skipconv``)."""
    return getattr(torch.ops, _NAMESPACE)


def module():
    """The extension module (``FramePlan``), or None when the kernels are not loaded."""
    return _module if available() else None


@contextlib.contextmanager
def disabled():
    """Run the enclosed code on the plain-PyTorch kernels (tests compare both paths)."""
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1
