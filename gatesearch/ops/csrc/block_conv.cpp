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

// Partial sums of R rows x J panels of 16 output channels (J <= kUnitPanels) over taps [t0, t1): acc[r][j] += sum
// over those taps t and channels c of a[r][tap_off[t] + c] * W[t * C + c][panel j's columns]. The sums stay in
// vector registers while the taps run; acc (the unit's rows, in L1) carries them from one chunk of taps to the next.
constexpr int kUnitPanels = 2;

template <int R, int J>
void rows_taps(const float* const* a, const int64_t* tap_off, int64_t t0, int64_t t1, int64_t C, const float* bp,
               int64_t K, f32x16 (*acc)[kUnitPanels]) {
  f32x16 s[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) s[r][j] = acc[r][j];
  for (int64_t t = t0; t < t1; ++t) {
    const float* b = bp + t * C * kLanes;
    const int64_t off = tap_off[t];
    for (int64_t c = 0; c < C; ++c) {
      f32x16 bv[J];
#pragma GCC unroll 2
      for (int j = 0; j < J; ++j) bv[j] = load16(b + (j * K + c) * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float v = a[r][off + c];
#pragma GCC unroll 2
        for (int j = 0; j < J; ++j) s[r][j] += v * bv[j];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = s[r][j];
}

using RowsFn = void (*)(const float* const*, const int64_t*, int64_t, int64_t, int64_t, const float*, int64_t,
                        f32x16 (*)[kUnitPanels]);
constexpr int kMaxRows = 8;  // R x J = 16 partial sums + J weight vectors: within the 32 vector registers
template <int J>
constexpr RowsFn kRows[kMaxRows + 1] = {nullptr,          rows_taps<1, J>, rows_taps<2, J>, rows_taps<3, J>,
                                        rows_taps<4, J>, rows_taps<5, J>, rows_taps<6, J>, rows_taps<7, J>,
                                        rows_taps<8, J>};

// Rows of one unit at a time, and K rows of the weight per chunk of taps: each chunk's slice of the panels
// (kChunkK x 16 x J floats, 8 KB at J = 2) stays in L1 while every row group of the unit passes over it. Row
// groups that each streamed the whole panels (K = 576 for a 64-channel 3x3 layer: 74 KB, more than L1) read them
// from L2 once per group, 8 times per 8x8 block.
constexpr int64_t kUnitRows = 64;
constexpr int64_t kChunkK = 64;

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
  const int64_t bw = bl.ox1 - bl.ox0, M = bl.area();
  const int64_t tchunk = std::max<int64_t>(1, kChunkK / C);  // taps per chunk
  const float* a[kUnitRows];
  float* z[kUnitRows];
  alignas(64) f32x16 acc[kUnitRows][kUnitPanels];
  const float* wp = w.data.data_ptr<float>();
  for (int64_t p = p0; p < p1; p += kUnitPanels) {
    const int J = static_cast<int>(std::min<int64_t>(kUnitPanels, p1 - p));
    const float* bp = wp + p * w.K * kLanes;
    for (int64_t m0 = 0; m0 < M; m0 += kUnitRows) {
      const int64_t mc = std::min(kUnitRows, M - m0);
      for (int64_t m = 0; m < mc; ++m) {
        const int64_t dy = (m0 + m) / bw, dx = (m0 + m) % bw;
        a[m] = halo + (dy * g.sh * h.pw + dx * g.sw) * C;
        z[m] = zp + bl.n * zs.n + (bl.oy0 + dy) * zs.h + (bl.ox0 + dx) * zs.w;
        for (int j = 0; j < J; ++j) acc[m][j] = f32x16{};
      }
      for (int64_t t0 = 0; t0 < taps; t0 += tchunk) {
        const int64_t t1 = std::min(taps, t0 + tchunk);
        for (int64_t m = 0; m < mc; m += kMaxRows) {
          const int64_t r = std::min<int64_t>(kMaxRows, mc - m);
          (J == 2 ? kRows<2> : kRows<1>)[r](a + m, offs, t0, t1, C, bp, w.K, acc + m);
        }
      }
      for (int64_t m = 0; m < mc; ++m)
        for (int j = 0; j < J; ++j) {
          const int64_t n0 = (p + j) * kLanes;
          float* dst = z[m] + n0;
          if (n0 + kLanes <= w.N) {
            store16(dst, load16(dst) + acc[m][j]);
          } else {
            for (int64_t i = 0; i < w.N - n0; ++i) dst[i] += acc[m][j][i];
          }
        }
    }
  }
}

}  // namespace gs
