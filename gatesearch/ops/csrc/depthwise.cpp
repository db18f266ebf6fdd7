// Depthwise (one input channel per group) block-sparse conv step: direct
// loops over the active blocks, no GEMM. MobileNet's 3x3 depthwise layers
// have 9 MACs per output value: an im2col would move more data than the
// conv computes.

#include "kernels.h"

namespace gs {
namespace {

// z[n, :, oy, ox] += acc[:] for any z layout (contiguous loop when channels_last).
inline void add_channels(float* dst, int64_t stride, const float* __restrict acc, int64_t C) {
  if (stride == 1) {
    for (int64_t c = 0; c < C; ++c) dst[c] += acc[c];
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c * stride] += acc[c];
  }
}

// out[c] = sum_t w[t][c] * in[t][c / mult] over the valid taps, 16 channels at
// a time so the partial sums stay in one vector register across the taps.
inline void depthwise_point(const float* const* in, const float* const* w, int64_t taps, int64_t C, int64_t mult,
                            float* __restrict out) {
  int64_t c0 = 0;
  if (mult == 1) {
    for (; c0 + kLanes <= C; c0 += kLanes) {
      f32x16 a = {};
      for (int64_t t = 0; t < taps; ++t) a += load16(w[t] + c0) * load16(in[t] + c0);
      store16(out + c0, a);
    }
  }
  for (int64_t c = c0; c < C; ++c) {
    float a = 0.f;
    for (int64_t t = 0; t < taps; ++t) a += w[t][c] * in[t][c / mult];
    out[c] = a;
  }
}

}  // namespace

void depthwise_block(const float* halo, const Halo& h, int64_t C, const Block& bl, const Geometry& g,
                     const float* wpack, int64_t Co, float* zp, const Strides& zs, float* acc) {
  const int64_t mult = Co / C, taps = g.taps();
  const float* in[64];
  const float* w[64];
  TORCH_CHECK(taps <= 64, "depthwise: kernels above 64 taps are not supported");
  for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
    for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) {
      for (int64_t ky = 0, t = 0; ky < g.kh; ++ky)
        for (int64_t kx = 0; kx < g.kw; ++kx, ++t) {
          in[t] = halo + (((oy - bl.oy0) * g.sh + ky * g.dh) * h.pw + (ox - bl.ox0) * g.sw + kx * g.dw) * C;
          w[t] = wpack + t * Co;
        }
      depthwise_point(in, w, taps, Co, mult, acc);
      add_channels(zp + bl.n * zs.n + oy * zs.h + ox * zs.w, zs.c, acc, Co);
    }
}

// Weight packed (T, Co), Co = Ci * mult. channels_last residuals are read in
// place; NCHW ones, residual pairs and block references go through the same
// per-block channel-minor patch as the GEMM path.
void depthwise(at::Tensor& z, const at::Tensor& r, const float* pp, const BlockRef* ref, const at::Tensor& wpack,
               const std::vector<Block>& blocks, const Geometry& g) {
  const Timer timer(&Profile::depthwise);
  const Input in(r, pp);
  const int64_t H = in.H, W = in.W, Ci = in.C, Co = z.size(1), mult = Co / Ci;
  const Strides& rs = in.s;
  const Strides zs(z);
  const bool direct = (rs.c == 1 || Ci == 1) && !pp && !ref;
  const float* wp = wpack.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  at::parallel_for(0, blocks.size(), grain(g.b * g.b * g.taps() * Co), [&](int64_t lo, int64_t hi) {
    std::vector<float> patch, acc(Co);
    std::vector<const float*> taps_in(g.taps()), taps_w(g.taps());
    for (int64_t i = lo; i < hi; ++i) {
      const Block& bl = blocks[i];
      const Halo h = g.halo(bl);
      if (!direct) {
        load_patch(in, bl.n, h, patch);
        if (ref) diff_and_refresh(patch.data(), ref->at(bl), h.ph * h.pw * Ci);
        depthwise_block(patch.data(), h, Ci, bl, g, wp, Co, zp, zs, acc.data());
        continue;
      }
      for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
        for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) {
          int64_t taps = 0;
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;  // reads zero padding
              taps_in[taps] = in.x + bl.n * rs.n + iy * rs.h + ix * rs.w;
              taps_w[taps++] = wp + (ky * g.kw + kx) * Co;
            }
          }
          depthwise_point(taps_in.data(), taps_w.data(), taps, Co, mult, acc.data());
          add_channels(zp + bl.n * zs.n + oy * zs.h + ox * zs.w, zs.c, acc.data(), Co);
        }
    }
  });
}

}  // namespace gs
