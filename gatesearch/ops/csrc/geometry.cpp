// Geometry parsing, operand checks and the list of active blocks (see kernels.h).

#include "kernels.h"

namespace gs {

Profile* profile = nullptr;

void check_dense_fp32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4,
              "skip_conv: ", name, " must be a 4-D fp32 CPU tensor");
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "skip_conv: ", name, " must be contiguous or channels_last");
}

const float* prev_ptr(const at::Tensor& r, const c10::optional<at::Tensor>& prev) {
  if (!prev.has_value() || !prev->defined()) return nullptr;
  TORCH_CHECK(prev->device().is_cpu() && prev->scalar_type() == at::kFloat, "skip_conv: r_prev must be fp32 CPU");
  TORCH_CHECK(prev->sizes() == r.sizes() && prev->strides() == r.strides(),
              "skip_conv: r_prev must match r in shape and strides");
  return prev->data_ptr<float>();
}

Geometry Geometry::parse(c10::IntArrayRef v) {
  TORCH_CHECK(v.size() == 12, "skip_conv: expected 12 geometry ints, got ", v.size());
  Geometry g{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], 0, 0};
  TORCH_CHECK(g.b >= 1 && g.Ho >= 1 && g.Wo >= 1, "skip_conv: bad block size or output size");
  g.Bh = (g.Ho + g.b - 1) / g.b;
  g.Bw = (g.Wo + g.b - 1) / g.b;
  return g;
}

Geometry Geometry::grid(int64_t block, int64_t Ho, int64_t Wo) {
  return parse({1, 1, 1, 1, 0, 0, 1, 1, 1, block, Ho, Wo});
}

void Geometry::check_mask(const at::Tensor& mask, int64_t N, const char* who) const {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3, who, ": mask must be bool (N, Hb, Wb)");
  TORCH_CHECK(mask.size(0) == N && mask.size(1) == Bh && mask.size(2) == Bw, who,
              ": mask does not match the block grid");
}

std::vector<Block> list_blocks(const at::Tensor& mask, const Geometry& g, int64_t* rows) {
  const at::Tensor m = mask.contiguous();
  const bool* p = m.data_ptr<bool>();
  const int64_t N = m.size(0);
  std::vector<Block> blocks;
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t by = 0; by < g.Bh; ++by)
      for (int64_t bx = 0; bx < g.Bw; ++bx) {
        if (!p[(n * g.Bh + by) * g.Bw + bx]) continue;
        blocks.push_back(g.block(n, by, bx, count));
        count += blocks.back().area();
      }
  *rows = count;
  return blocks;
}

}  // namespace gs
