// Input halos of output blocks, and the per-block references of the "block"
// reference mode (see BlockRef in kernels.h and gatesearch/ops/block_ref.py).

#include "kernels.h"

namespace gs {

// NCHW inputs are transposed patch by patch (only the halo of the active
// blocks, not the whole tensor) so the im2col can copy whole channel vectors
// in either layout.
void load_patch(const Input& in, int64_t n, const Halo& h, std::vector<float>& buf) {
  const auto [iy0, ix0, ph, pw] = h;
  const int64_t C = in.C;
  buf.resize(ph * pw * C);
  float* dst = buf.data();
  if (iy0 < 0 || ix0 < 0 || iy0 + ph > in.H || ix0 + pw > in.W) std::fill(buf.begin(), buf.end(), 0.f);
  const int64_t y_lo = std::max<int64_t>(0, -iy0), y_hi = std::min(ph, in.H - iy0);
  const int64_t x_lo = std::max<int64_t>(0, -ix0), x_hi = std::min(pw, in.W - ix0);
  // 16 channels at a time per patch row: the written cache lines stay in L1
  // while the 16 channel rows fill them.
  for (int64_t py = y_lo; py < y_hi; ++py)
    for (int64_t c0 = 0; c0 < C; c0 += 16)
      for (int64_t c = c0; c < std::min(c0 + 16, C); ++c) {
        const int64_t off = n * in.s.n + c * in.s.c + (iy0 + py) * in.s.h + ix0 * in.s.w;
        const float* src = in.x + off;
        float* row = dst + py * pw * C + c;
        if (in.prev) {
          const float* old = in.prev + off;
          for (int64_t px = x_lo; px < x_hi; ++px) row[px * C] = src[px * in.s.w] - old[px * in.s.w];
        } else {
          for (int64_t px = x_lo; px < x_hi; ++px) row[px * C] = src[px * in.s.w];
        }
      }
}

Halo read_halo(const Input& x, const Block& bl, const Geometry& g, float* dst) {
  const Halo h = g.halo(bl);
  const auto [iy0, ix0, ph, pw] = h;
  const int64_t C = x.C;
  const bool edge = iy0 < 0 || ix0 < 0 || iy0 + ph > x.H || ix0 + pw > x.W;
  if (edge) std::fill(dst, dst + ph * pw * C, 0.f);
  const int64_t y_lo = std::max<int64_t>(0, -iy0), y_hi = std::min(ph, x.H - iy0);
  const int64_t x_lo = std::max<int64_t>(0, -ix0), x_hi = std::min(pw, x.W - ix0);
  if (x_hi <= x_lo) return h;
  for (int64_t py = y_lo; py < y_hi; ++py) {
    const float* row = x.x + bl.n * x.s.n + (iy0 + py) * x.s.h + (ix0 + x_lo) * x.s.w;
    if (x.s.c == 1) {  // channels_last: a patch row is one contiguous run
      std::memcpy(dst + (py * pw + x_lo) * C, row, (x_hi - x_lo) * C * sizeof(float));
    } else {  // other strides (NCHW): correct, but a transpose
      for (int64_t px = 0; px < x_hi - x_lo; ++px)
        for (int64_t c = 0; c < C; ++c) dst[(py * pw + x_lo + px) * C + c] = row[px * x.s.w + c * x.s.c];
    }
  }
  return h;
}

bool halo_quiet(const Input& x, const Block& bl, const Geometry& g, const float* ref, float thr, float sc) {
  if (x.s.c != 1 || x.prev) return false;  // channels_last halos only (a frame plan's slots)
  const auto [iy0, ix0, ph, pw] = g.halo(bl);
  const int64_t C = x.C;
  const float* base = x.x + bl.n * x.s.n;
  float total = 0.f;
  for (int64_t py = 0; py < ph; ++py) {
    const int64_t iy = iy0 + py;
    const bool row_in = iy >= 0 && iy < x.H;
    for (int64_t px = 0; px < pw; ++px) {
      const int64_t ix = ix0 + px;
      const float* r = ref + (py * pw + px) * C;
      // the same sums, in the same order, as block_fires on the formed residual x - ref (0 - ref in the padding)
      total += row_in && ix >= 0 && ix < x.W ? abs_diff_sum(base + iy * x.s.h + ix * x.s.w, r, C)
                                             : abs_diff_sum(r, nullptr, C);
    }
  }
  return total * sc <= thr;
}

bool halo_changed(const bool* changed, int64_t H, int64_t W, const Block& bl, const Geometry& g) {
  const auto [iy0, ix0, ph, pw] = g.halo(bl);
  const int64_t y1 = std::min(H, iy0 + ph), x1 = std::min(W, ix0 + pw);
  for (int64_t y = std::max<int64_t>(0, iy0); y < y1; ++y) {
    const bool* row = changed + (bl.n * H + y) * W;
    for (int64_t x = std::max<int64_t>(0, ix0); x < x1; ++x)
      if (row[x]) return true;
  }
  return false;
}

BlockRef block_ref(const at::Tensor& ref, const Geometry& g, const at::Tensor& x) {
  TORCH_CHECK(ref.is_contiguous() && ref.scalar_type() == at::kFloat && ref.device().is_cpu(),
              "skip_conv: block reference must be a contiguous fp32 CPU tensor");
  BlockRef br;
  br.g = &g;
  br.slot = g.slot(x.size(1));
  TORCH_CHECK(ref.numel() == x.size(0) * g.Bh * g.Bw * br.slot, "skip_conv: block reference has the wrong size");
  br.data = ref.data_ptr<float>();
  return br;
}

// ref[block] <- halo of x for every block (mask undefined) or the active ones.
void refresh_block_ref_(at::Tensor& ref_t, const at::Tensor& x, const c10::optional<at::Tensor>& mask_in,
                        c10::IntArrayRef geom) {
  const Geometry g = Geometry::parse(geom);
  check_dense_fp32(x, "x");
  const BlockRef ref = block_ref(ref_t, g, x);
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) mask = mask_in->contiguous();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const Input in(x);
  for_blocks(g, in.N, mp, ref.slot, [&](const Block& bl, std::vector<float>&) { read_halo(in, bl, g, ref.at(bl)); });
}

}  // namespace gs
