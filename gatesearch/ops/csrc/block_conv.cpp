// One output block's conv straight from its residual halo into z: the
// per-block step of a native frame (conv_step.cpp) for layers whose weight stays
// in cache.
//
// The gather -> GEMM -> scatter path (gather_gemm.cpp) writes every active
// position's receptive field into a matrix, calls a library GEMM and adds the
// result back into z. On small layers (tens of channels, a few hundred
// active rows) the library call, the matrix and the scatter cost as much as
// the multiply-adds: with 32 output channels every gathered value feeds just
// 32 of them. Here a register-blocked kernel reads the rows of one block
// from its halo (each tap of each output is a contiguous run of channels in
// the channel-minor halo), keeps R rows x 32 output channels of partial sums
// in vector registers, and adds them into z in place: no matrix, no call, no
// scatter, and each block is independent, so threads split blocks.

#include "kernels.h"

namespace gs {

PanelWeight pack_panels(const at::Tensor& wpack) {
  TORCH_CHECK(wpack.dim() == 3 && wpack.size(0) == 1 && wpack.is_contiguous() && wpack.scalar_type() == at::kFloat,
              "block_conv: expected the GEMM-packed weight (1, K, N)");
  PanelWeight w;
  w.K = wpack.size(1);
  w.N = wpack.size(2);
  w.panels = (w.N + kLanes - 1) / kLanes;
  w.data = at::zeros({w.panels, w.K, kLanes}, wpack.options());
  const float* src = wpack.data_ptr<float>();
  float* dst = w.data.data_ptr<float>();
  for (int64_t p = 0; p < w.panels; ++p)
    for (int64_t k = 0; k < w.K; ++k)
      for (int64_t j = 0; j < kLanes && p * kLanes + j < w.N; ++j)
        dst[(p * w.K + k) * kLanes + j] = src[k * w.N + p * kLanes + j];
  return w;
}

namespace {

// z rows += sum over taps t and channels c of a[r][tap_off[t] + c] * W[t * C + c][panel columns], for R rows and
// J panels of 16 output channels starting at panel p0.
template <int R, int J>
void rows_kernel(const float* const* a, const int64_t* tap_off, int64_t taps, int64_t C, const PanelWeight& w,
                 int64_t p0, float* const* z) {
  f32x16 acc[R][J] = {};
  const float* bp = w.data.data_ptr<float>() + p0 * w.K * kLanes;
  for (int64_t t = 0; t < taps; ++t) {
    const float* b = bp + t * C * kLanes;
    const int64_t off = tap_off[t];
    for (int64_t c = 0; c < C; ++c) {
      f32x16 bv[J];
#pragma GCC unroll 2
      for (int j = 0; j < J; ++j) bv[j] = load16(b + (j * w.K + c) * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float v = a[r][off + c];
#pragma GCC unroll 2
        for (int j = 0; j < J; ++j) acc[r][j] += v * bv[j];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      const int64_t n0 = (p0 + j) * kLanes;
      float* dst = z[r] + n0;
      if (n0 + kLanes <= w.N) {
        store16(dst, load16(dst) + acc[r][j]);
      } else {
        for (int64_t i = 0; i < w.N - n0; ++i) dst[i] += acc[r][j][i];
      }
    }
}

template <int R>
void rows_panels(const float* const* a, const int64_t* tap_off, int64_t taps, int64_t C, const PanelWeight& w,
                 int64_t p0, int64_t p1, float* const* z) {
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) rows_kernel<R, 2>(a, tap_off, taps, C, w, p, z);
  if (p < p1) rows_kernel<R, 1>(a, tap_off, taps, C, w, p, z);
}

using RowsFn = void (*)(const float* const*, const int64_t*, int64_t, int64_t, const PanelWeight&, int64_t, int64_t,
                        float* const*);
constexpr int kMaxRows = 8;
constexpr RowsFn kRows[kMaxRows + 1] = {nullptr,
                                        rows_panels<1>,
                                        rows_panels<2>,
                                        rows_panels<3>,
                                        rows_panels<4>,
                                        rows_panels<5>,
                                        rows_panels<6>,
                                        rows_panels<7>,
                                        rows_panels<8>};

}  // namespace

void block_conv(const float* halo, const Halo& h, int64_t C, const Block& bl, const Geometry& g,
                const PanelWeight& w, float* zp, const Strides& zs, int64_t p0, int64_t p1) {
  const int64_t taps = g.taps();
  int64_t tap_off[64];
  std::vector<int64_t> tap_heap;
  int64_t* offs = tap_off;
  if (taps > 64) {
    tap_heap.resize(taps);
    offs = tap_heap.data();
  }
  for (int64_t ky = 0, t = 0; ky < g.kh; ++ky)
    for (int64_t kx = 0; kx < g.kw; ++kx, ++t) offs[t] = (ky * g.dh * h.pw + kx * g.dw) * C;
  const float* a[kMaxRows];
  float* z[kMaxRows];
  int r = 0;
  for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
    for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) {
      a[r] = halo + ((oy - bl.oy0) * g.sh * h.pw + (ox - bl.ox0) * g.sw) * C;
      z[r] = zp + bl.n * zs.n + oy * zs.h + ox * zs.w;
      if (++r == kMaxRows) {
        kRows[r](a, offs, taps, C, w, p0, p1, z);
        r = 0;
      }
    }
  if (r) kRows[r](a, offs, taps, C, w, p0, p1, z);
}

}  // namespace gs
