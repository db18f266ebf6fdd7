// The GEMM path of a block-sparse conv step: im2col of the active positions
// only, one GEMM (ATen: MKL or oneDNN), scatter-add into z. Also the dense
// path's tail, z += out on the active blocks.
//
// Why C++: at 10 % block density the useful GEMM of a 64-channel 56x56 layer
// takes ~0.12 ms, and a dozen eager PyTorch ops around it (gate, index
// building, gather, scatter) cost about as much again.

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

#include "kernels.h"

namespace gs {
namespace {

// out is (M, Co) row-major: row m holds the Co results of output position m.
// Blocks are disjoint: no races.
void scatter_add(at::Tensor& z, const std::vector<Block>& blocks, const float* out) {
  const Timer timer(&Profile::scatter);
  const int64_t Co = z.size(1);
  const Strides zs(z);
  float* zp = z.data_ptr<float>();
  const int64_t area = blocks.empty() ? 1 : blocks[0].area();
  at::parallel_for(0, blocks.size(), grain(area * Co), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Block& bl = blocks[i];
      const int64_t width = bl.ox1 - bl.ox0;
      if (zs.c == 1) {  // channels_last z: add whole channel vectors
        int64_t m = bl.m0;
        for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
          for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox, ++m) {
            float* dst = zp + bl.n * zs.n + oy * zs.h + ox * zs.w;
            const float* src = out + m * Co;
            for (int64_t c = 0; c < Co; ++c) dst[c] += src[c];
          }
      } else {  // NCHW z: contiguous runs along each output row, per channel
        for (int64_t c = 0; c < Co; ++c)
          for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy) {
            float* dst = zp + bl.n * zs.n + c * zs.c + oy * zs.h + bl.ox0 * zs.w;
            const float* src = out + (bl.m0 + (oy - bl.oy0) * width) * Co + c;
            for (int64_t j = 0; j < width; ++j) dst[j * zs.w] += src[j * Co];
          }
      }
    }
  });
}

// oneDNN builds a kernel per row count (~0.5 ms, then cached), so the rows
// are padded with zeros to one of 8 sizes per octave.
int64_t bucket_rows(int64_t m) {
  int64_t octave = 1;
  while (octave * 2 <= m) octave *= 2;
  const int64_t step = std::max<int64_t>(8, octave / 8);
  return (m + step - 1) / step * step;
}

at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& weight) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{a, weight, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                 c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// im2col of the active positions only -> cols (G, M, T*Cg), columns ordered
// (tap, channel-in-group) so every tap copies Cg contiguous floats; then one
// GEMM (G == 1) or batched GEMM against the weight packed as (G, T*Cg, Cog).
// With ``onednn`` (the G == 1 weight reordered by mkldnn::_reorder_linear_weight)
// the GEMM is oneDNN's: at the few rows of a deep layer (M ~ 20, K = 4608) it
// runs ~1.4x faster than MKL's sgemm behind at::mm, most of all with the weight
// cold in cache. Returns out (G, M, Cog).
at::Tensor gather_gemm(const at::Tensor& r, const float* pp, const BlockRef* ref, const at::Tensor& wpack,
                       const at::Tensor& onednn, const std::vector<Block>& blocks, const Geometry& g, int64_t M) {
  const Input in(r, pp);
  const int64_t H = in.H, W = in.W, Ci = in.C, G = g.groups, Cg = Ci / G;
  const int64_t Kg = g.taps() * Cg;
  const Strides& rs = in.s;
  const bool direct = (rs.c == 1 || Ci == 1) && !ref;  // channel vectors already contiguous
  const bool use_onednn = onednn.defined() && G == 1;
  const int64_t rows = use_onednn ? bucket_rows(M) : M;
  std::optional<Timer> gathering;
  gathering.emplace(&Profile::gather);
  at::Tensor cols = at::empty({G, rows, Kg}, r.options().memory_format(at::MemoryFormat::Contiguous));
  float* cp = cols.data_ptr<float>();
  if (rows > M) std::memset(cp + M * Kg, 0, (rows - M) * Kg * sizeof(float));
  at::parallel_for(0, blocks.size(), grain(g.b * g.b * g.taps() * Ci), [&](int64_t lo, int64_t hi) {
    std::vector<float> patch;
    for (int64_t i = lo; i < hi; ++i) {
      const Block& bl = blocks[i];
      const Halo h = g.halo(bl);
      if (!direct) load_patch(in, bl.n, h, patch);
      if (ref) diff_and_refresh(patch.data(), ref->at(bl), h.ph * h.pw * Ci);
      int64_t m = bl.m0;
      for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
        for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox, ++m)
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const int64_t ix = ox * g.sw - g.pw + kx * g.dw, t = ky * g.kw + kx;
              const float *src = nullptr, *old = nullptr;
              if (!direct) {
                src = patch.data() + ((iy - h.iy0) * h.pw + (ix - h.ix0)) * Ci;
              } else if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
                const int64_t off = bl.n * rs.n + iy * rs.h + ix * rs.w;
                src = in.x + off;
                if (pp) old = pp + off;
              }
              for (int64_t gi = 0; gi < G; ++gi) {
                float* dst = cp + (gi * M + m) * Kg + t * Cg;
                if (old) {
                  for (int64_t j = gi * Cg; j < (gi + 1) * Cg; ++j) dst[j - gi * Cg] = src[j] - old[j];
                } else if (src) {
                  std::memcpy(dst, src + gi * Cg, Cg * sizeof(float));
                } else {
                  std::memset(dst, 0, Cg * sizeof(float));
                }
              }
            }
          }
    }
  });
  gathering.reset();
  const Timer timer(&Profile::gemm);
  if (use_onednn) return onednn_linear(cols[0], onednn).narrow(0, 0, M).unsqueeze(0);
  if (G == 1) return at::mm(cols[0], wpack[0]).unsqueeze(0);
  return at::bmm(cols, wpack);
}

// Bytes of the gathered matrix per GEMM: at low density everything is one
// GEMM; at high density the rows are split into near-equal chunks that stay in
// cache, which also bounds the scratch memory for big layers.
constexpr int64_t kChunkBytes = 1024 * 1024;

}  // namespace

void gather_gemm_scatter(at::Tensor& z, const at::Tensor& r, const float* pp, const BlockRef* ref,
                         const at::Tensor& wpack, const at::Tensor& onednn, const std::vector<Block>& blocks,
                         const Geometry& g, int64_t M) {
  const int64_t K = g.taps() * r.size(1);
  const int64_t max_rows = std::max<int64_t>(256, kChunkBytes / (4 * K));
  const int64_t chunks = (M + max_rows - 1) / max_rows;
  const int64_t target = (M + chunks - 1) / chunks;
  std::vector<Block> part;
  for (size_t start = 0; start < blocks.size();) {
    part.clear();
    const int64_t base = blocks[start].m0;
    int64_t rows = 0;
    for (; start < blocks.size() && rows < target; ++start) {
      part.push_back(blocks[start]);
      part.back().m0 -= base;
      rows += blocks[start].area();
    }
    const at::Tensor out = gather_gemm(r, pp, ref, wpack, onednn, part, g, rows);  // (G, rows, Cog)
    // (G, rows, Cog) -> (rows, Co): free when G == 1
    const at::Tensor flat = g.groups == 1 ? out : out.permute({1, 0, 2}).contiguous();
    scatter_add(z, part, flat.data_ptr<float>());
  }
}

// Dense path tail: z += out (or z = out with copy) on the active blocks only (no float mask tensor).
void masked_add_(at::Tensor& z, const at::Tensor& out, const at::Tensor& mask, int64_t block, bool copy) {
  check_dense_fp32(z, "z");
  check_dense_fp32(out, "out");
  TORCH_CHECK(z.sizes() == out.sizes(), "masked_add_: z and out differ in shape");
  const Geometry g = Geometry::grid(block, z.size(2), z.size(3));
  g.check_mask(mask, z.size(0), "masked_add_");
  int64_t M = 0;
  const std::vector<Block> blocks = list_blocks(mask, g, &M);
  const int64_t C = z.size(1);
  const Strides zs(z), os(out);
  float* zp = z.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  at::parallel_for(0, blocks.size(), grain(block * block * C), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Block& bl = blocks[i];
      if (zs.c == 1 && os.c == 1) {
        for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
          for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) {
            float* dst = zp + bl.n * zs.n + oy * zs.h + ox * zs.w;
            const float* src = op + bl.n * os.n + oy * os.h + ox * os.w;
            if (copy)
              std::memcpy(dst, src, C * sizeof(float));
            else
              for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
          }
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy) {
            float* dst = zp + bl.n * zs.n + c * zs.c + oy * zs.h;
            const float* src = op + bl.n * os.n + c * os.c + oy * os.h;
            if (copy)
              for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) dst[ox * zs.w] = src[ox * os.w];
            else
              for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) dst[ox * zs.w] += src[ox * os.w];
          }
      }
    }
  });
}

}  // namespace gs
