// The operators the Python side calls (torch.ops.gatesearch_skipconv.*):
// the block-sparse conv step's entry point and the registration of every
// kernel in this folder except changes.cpp, which registers its own.

#include <torch/library.h>

#include "kernels.h"

namespace gs {

// Defined in gate.cpp, block_ref.cpp and gather_gemm.cpp.
at::Tensor gate_block_mask(const at::Tensor& r, c10::IntArrayRef geom, double threshold, double scale,
                           const c10::optional<at::Tensor>& r_prev);
at::Tensor gate_block_ref(const at::Tensor& x, const at::Tensor& ref, c10::IntArrayRef geom, double threshold,
                          double scale, const c10::optional<at::Tensor>& changed);
at::Tensor gate_block_linear(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& wpack, double bias,
                             c10::IntArrayRef geom);
int64_t active_positions(const at::Tensor& mask, int64_t block, int64_t Ho, int64_t Wo);
void refresh_block_ref_(at::Tensor& ref, const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                        c10::IntArrayRef geom);
void masked_add_(at::Tensor& z, const at::Tensor& out, const at::Tensor& mask, int64_t block, bool copy);

namespace {

enum Kind : int64_t { kGemm = 0, kDepthwise = 1 };  // values shared with ops/packing.py: Kind

// z += upsample(mask) * conv(r, w) computing only the active blocks.
// Returns the number of recomputed output positions (over the batch), or -1
// without touching z when that number exceeds max_rows (the caller then runs
// the dense path: the crossover decision costs no extra pass over the mask).
int64_t block_sparse_accumulate_(at::Tensor& z, const at::Tensor& r, const at::Tensor& wpack, const at::Tensor& mask,
                                 c10::IntArrayRef geom, int64_t kind, int64_t max_rows,
                                 const c10::optional<at::Tensor>& r_prev, const c10::optional<at::Tensor>& ref_in,
                                 const c10::optional<at::Tensor>& onednn_in) {
  const Geometry g = Geometry::parse(geom);
  check_dense_fp32(z, "z");
  check_dense_fp32(r, "r");
  TORCH_CHECK(wpack.is_contiguous() && wpack.scalar_type() == at::kFloat, "skip_conv: packed weight must be fp32");
  const int64_t N = r.size(0), Ci = r.size(1), Co = z.size(1);
  TORCH_CHECK(z.size(0) == N, "skip_conv: batch sizes of z, r and mask differ");
  TORCH_CHECK(z.size(2) == g.Ho && z.size(3) == g.Wo, "skip_conv: z does not match the conv output size");
  g.check_mask(mask, N, "skip_conv");
  TORCH_CHECK(g.groups > 0 && Ci % g.groups == 0 && Co % g.groups == 0, "skip_conv: bad groups");
  TORCH_CHECK(wpack.numel() == Co * (Ci / g.groups) * g.taps(), "skip_conv: packed weight has the wrong size");
  const float* pp = prev_ptr(r, r_prev);
  TORCH_CHECK(!(pp && ref_in.has_value()), "skip_conv: give r_prev or a block reference, not both");
  BlockRef ref;
  if (ref_in.has_value() && ref_in->defined()) ref = block_ref(*ref_in, g, r);
  const BlockRef* rf = ref.data ? &ref : nullptr;
  int64_t M = 0;
  const std::vector<Block> blocks = list_blocks(mask, g, &M);
  if (M > max_rows) return -1;
  if (M == 0) return 0;
  switch (kind) {
    case kGemm:
      gather_gemm_scatter(z, r, pp, rf, wpack, onednn_in.has_value() ? *onednn_in : at::Tensor(), blocks, g, M);
      break;
    case kDepthwise:
      depthwise(z, r, pp, rf, wpack, blocks, g);
      break;
    default:
      TORCH_CHECK(false, "skip_conv: unknown kernel kind ", kind);
  }
  return M;
}

}  // namespace
}  // namespace gs

TORCH_LIBRARY(gatesearch_skipconv, m) {
  m.def("gate_block_mask(Tensor r, int[] geometry, float threshold, float scale, Tensor? r_prev=None) -> Tensor");
  m.def(
      "block_sparse_accumulate_(Tensor(a!) z, Tensor r, Tensor wpack, Tensor mask, int[] geometry, int kind, "
      "int max_rows, Tensor? r_prev=None, Tensor(b!)? block_ref=None, Tensor? onednn_weight=None) -> int");
  m.def("refresh_block_ref_(Tensor(a!) ref, Tensor x, Tensor? mask, int[] geometry) -> ()");
  m.def("gate_block_ref(Tensor x, Tensor ref, int[] geometry, float threshold, float scale, Tensor? changed=None) -> Tensor");
  m.def("gate_block_linear(Tensor x, Tensor x_prev, Tensor weight, float bias, int[] geometry) -> Tensor");
  m.def("active_positions(Tensor mask, int block, int Ho, int Wo) -> int");
  m.def("masked_add_(Tensor(a!) z, Tensor out, Tensor mask, int block, bool copy=False) -> ()");
}

TORCH_LIBRARY_IMPL(gatesearch_skipconv, CPU, m) {
  m.impl("gate_block_mask", &gs::gate_block_mask);
  m.impl("block_sparse_accumulate_", &gs::block_sparse_accumulate_);
  m.impl("masked_add_", &gs::masked_add_);
  m.impl("active_positions", &gs::active_positions);
  m.impl("refresh_block_ref_", &gs::refresh_block_ref_);
  m.impl("gate_block_ref", &gs::gate_block_ref);
  m.impl("gate_block_linear", &gs::gate_block_linear);
}

// A oneDNN-reordered weight is an MkldnnCPU tensor, which then decides the dispatch key.
TORCH_LIBRARY_IMPL(gatesearch_skipconv, MkldnnCPU, m) {
  m.impl("block_sparse_accumulate_", &gs::block_sparse_accumulate_);
}
