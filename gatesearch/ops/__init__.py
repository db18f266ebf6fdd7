"""Execution kernels that make Skip-Convolution skipping real on CPU.

Skip-Convolutions (Habibian et al., CVPR 2021), Eq. 3: z_t = z_{t-1} +
g(r_t) ⊙ (w * r_t), with g a structured norm gate (Eq. 5 / Eq. 7, b×b blocks).
``accumulate_masked_dense_`` is the reference; ``accumulate_block_sparse_``
computes only the active blocks (C++ kernels built on first use, plain PyTorch
fallback); ``norm_gate_block_mask`` is the cheap gate; ``block_density`` the
fraction of output positions recomputed.
"""

from gatesearch.ops import changes
from gatesearch.ops.block_ref import BlockReference
from gatesearch.ops.block_sparse import PATHS, accumulate_block_sparse_, sparse_rows_limit, sparse_step
from gatesearch.ops.crossover import calibrate as calibrate_crossover
from gatesearch.ops.crossover import crossover_density
from gatesearch.ops.gate import active_positions, block_density, norm_gate, norm_gate_block_mask, upsample_block_mask
from gatesearch.ops.geometry import ConvGeometry, resolve_geometry
from gatesearch.ops.reference import accumulate_masked_dense_


def native_available() -> bool:
    """Whether the C++ kernels are in use (builds them on first call, ~15 s once per machine)."""
    from gatesearch.ops import _native

    return _native.available()


__all__ = [
    "BlockReference",
    "PATHS",
    "ConvGeometry",
    "accumulate_block_sparse_",
    "accumulate_masked_dense_",
    "active_positions",
    "block_density",
    "calibrate_crossover",
    "changes",
    "crossover_density",
    "native_available",
    "norm_gate",
    "norm_gate_block_mask",
    "resolve_geometry",
    "sparse_rows_limit",
    "sparse_step",
    "upsample_block_mask",
]
