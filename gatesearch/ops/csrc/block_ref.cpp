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

namespace {

// acc += |a - b| (b null: |a|) over n floats, four vectors at a time (independent chains: the sum of one position's
// channels no longer waits on a horizontal add).
inline void add_abs_diff(const float* __restrict a, const float* __restrict b, int64_t n, f32x16* acc,
                         float& tail) {
  int64_t i = 0;
  if (b) {
    for (; i + 64 <= n; i += 64)
      for (int k = 0; k < 4; ++k) acc[k] += abs16(load16(a + i + 16 * k) - load16(b + i + 16 * k));
    for (; i + 16 <= n; i += 16) acc[0] += abs16(load16(a + i) - load16(b + i));
    for (; i < n; ++i) tail += std::fabs(a[i] - b[i]);
  } else {
    for (; i + 64 <= n; i += 64)
      for (int k = 0; k < 4; ++k) acc[k] += abs16(load16(a + i + 16 * k));
    for (; i + 16 <= n; i += 16) acc[0] += abs16(load16(a + i));
    for (; i < n; ++i) tail += std::fabs(a[i]);
  }
}

}  // namespace

bool halo_quiet(const Input& x, const Block& bl, const Geometry& g, const float* ref, float thr, float sc) {
  if (x.s.c != 1 || x.prev || !(thr >= 0.f)) return false;  // channels_last halos only; a negative threshold opens
  const auto [iy0, ix0, ph, pw] = g.halo(bl);
  const int64_t C = x.C, n = ph * pw * C;
  const int64_t x_lo = std::max<int64_t>(0, -ix0), x_hi = std::max(x_lo, std::min(pw, x.W - ix0));
  f32x16 acc[4] = {};
  float tail = 0.f;
  for (int64_t py = 0; py < ph; ++py) {
    const int64_t iy = iy0 + py;
    const float* r = ref + py * pw * C;
    if (iy < 0 || iy >= x.H || x_hi == x_lo) {  // a row of padding: x reads 0 there
      add_abs_diff(r, nullptr, pw * C, acc, tail);
      continue;
    }
    add_abs_diff(r, nullptr, x_lo * C, acc, tail);
    add_abs_diff(x.x + bl.n * x.s.n + iy * x.s.h + (ix0 + x_lo) * x.s.w, r + x_lo * C, (x_hi - x_lo) * C, acc, tail);
    add_abs_diff(r + x_hi * C, nullptr, (pw - x_hi) * C, acc, tail);
  }
  const double total = static_cast<double>(add_lanes(tail, (acc[0] + acc[1]) + (acc[2] + acc[3])));
  // Summed in another order than block_fires, so with a margin: n non-negative fp32 terms summed in any order are
  // within n * 2^-24 (relative) of their exact sum, so a total below thr * (1 - 4 n 2^-24) is below the threshold
  // whatever block_fires' order, and so is every window it would sum. At thr = 0 only an all-zero halo is quiet.
  return total * sc <= static_cast<double>(thr) * (1.0 - 4.0 * 5.9604645e-8 * static_cast<double>(n));
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
