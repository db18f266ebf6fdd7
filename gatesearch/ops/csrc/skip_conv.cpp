// Block-sparse Skip-Conv kernels for CPU (Skip-Convolutions, Eq. 3, 5, 7 and
// "Structured Sparsity", Sec. 3.2.2).
//
// Why C++: at 10 % block density the useful GEMM of a 64-channel 56x56 layer
// takes ~0.12 ms, and a dozen eager PyTorch ops around it (gate, index
// building, gather, scatter) cost about as much again. Here the gate is one
// call and gather -> GEMM -> scatter-add is another; the GEMM itself stays in
// ATen (MKL / oneDNN), everything else is plain loops the compiler vectorises.
//
// Layouts: r and z are fp32, either NCHW-contiguous or channels_last
// (the Python side guarantees one of the two). Geometry arrives as a flat int
// list whose order is fixed by gatesearch/ops/geometry.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

struct Conv {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, groups, b, Ho, Wo;
};

// [kh, kw, sh, sw, ph, pw, dh, dw, groups, block, Ho, Wo]
Conv parse_conv(c10::IntArrayRef g) {
  TORCH_CHECK(g.size() == 12, "skip_conv: expected 12 geometry ints, got ", g.size());
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]};
}

bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_dense_fp32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4,
              "skip_conv: ", name, " must be a 4-D fp32 CPU tensor");
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "skip_conv: ", name, " must be contiguous or channels_last");
}

// Element strides of a 4-D (N, C, H, W) tensor, whatever its memory format.
struct Strides {
  int64_t n, c, h, w;
  explicit Strides(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// One active block of one stream: output rows [oy0, oy1) x cols [ox0, ox1).
// Its positions occupy rows m0 .. m0 + area of the gathered matrix, row-major.
struct Block {
  int64_t n, oy0, oy1, ox0, ox1, m0;
};

std::vector<Block> list_blocks(const at::Tensor& mask, const Conv& cv, int64_t* rows) {
  const at::Tensor m = mask.contiguous();
  const bool* p = m.data_ptr<bool>();
  const int64_t N = m.size(0), Bh = m.size(1), Bw = m.size(2);
  std::vector<Block> blocks;
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t by = 0; by < Bh; ++by) {
      for (int64_t bx = 0; bx < Bw; ++bx) {
        if (!p[(n * Bh + by) * Bw + bx]) continue;
        const int64_t oy0 = by * cv.b, ox0 = bx * cv.b;
        const int64_t oy1 = std::min(oy0 + cv.b, cv.Ho), ox1 = std::min(ox0 + cv.b, cv.Wo);
        blocks.push_back({n, oy0, oy1, ox0, ox1, count});
        count += (oy1 - oy0) * (ox1 - ox0);
      }
    }
  }
  *rows = count;
  return blocks;
}

// ---------------------------------------------------------------------------
// Gate: Eq. 5 / Eq. 7 with p = 1, max-pooled over b x b blocks.
// ---------------------------------------------------------------------------

// a[n, y, x] = sum_c |r[n, c, y, x]|  -> (N, H, W)
void channel_abs_sum(const at::Tensor& r, float* a) {
  const int64_t N = r.size(0), C = r.size(1), HW = r.size(2) * r.size(3);
  const float* src = r.data_ptr<float>();
  if (is_channels_last(r)) {
    at::parallel_for(0, N * HW, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float* p = src + i * C;
        float acc[16] = {0.f};
        int64_t c = 0;
        for (; c + 16 <= C; c += 16)
          for (int j = 0; j < 16; ++j) acc[j] += std::fabs(p[c + j]);
        float s = 0.f;
        for (; c < C; ++c) s += std::fabs(p[c]);
        for (int j = 0; j < 16; ++j) s += acc[j];
        a[i] = s;
      }
    });
  } else {
    constexpr int64_t kChunk = 512;  // positions per task: keeps the partial sums in L1
    const int64_t chunks = (HW + kChunk - 1) / kChunk;
    at::parallel_for(0, N * chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n = t / chunks, i0 = (t % chunks) * kChunk, i1 = std::min(i0 + kChunk, HW);
        float* dst = a + n * HW;
        for (int64_t i = i0; i < i1; ++i) dst[i] = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          const float* p = src + (n * C + c) * HW;
          for (int64_t i = i0; i < i1; ++i) dst[i] += std::fabs(p[i]);
        }
      }
    });
  }
}

// geometry: [kh, kw, sh, sw, ph, pw, dh, dw, block, Ho, Wo]
at::Tensor gate_block_mask(const at::Tensor& r_in, c10::IntArrayRef geom, double threshold, double scale) {
  TORCH_CHECK(geom.size() == 11, "gate_block_mask: expected 11 geometry ints");
  check_dense_fp32(r_in, "r");
  const int64_t kh = geom[0], kw = geom[1], sh = geom[2], sw = geom[3], ph = geom[4], pw = geom[5];
  const int64_t dh = geom[6], dw = geom[7], b = geom[8], Ho = geom[9], Wo = geom[10];
  const int64_t N = r_in.size(0), H = r_in.size(2), W = r_in.size(3);
  const int64_t Bh = (Ho + b - 1) / b, Bw = (Wo + b - 1) / b;

  std::vector<float> a(N * H * W);
  channel_abs_sum(r_in, a.data());

  // Separable box filter over the dilated kernel support (zero padding).
  // Sums of non-negative floats are 0 only if every term is 0, so a zero
  // threshold keeps exactly the outputs that see a non-zero residual.
  std::vector<float> rows(N * H * Wo);  // horizontal window sums, (N, H, Wo)
  at::parallel_for(0, N * H, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t ny = lo; ny < hi; ++ny) {
      const float* src = a.data() + ny * W;
      float* dst = rows.data() + ny * Wo;
      for (int64_t ox = 0; ox < Wo; ++ox) {
        float s = 0.f;
        for (int64_t kx = 0; kx < kw; ++kx) {
          const int64_t ix = ox * sw - pw + kx * dw;
          if (ix >= 0 && ix < W) s += src[ix];
        }
        dst[ox] = s;
      }
    }
  });

  at::Tensor out = at::zeros({N, Bh, Bw}, at::kBool);
  bool* o = out.data_ptr<bool>();
  const float thr = static_cast<float>(threshold), sc = static_cast<float>(scale);
  at::parallel_for(0, N * Bh, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(Wo);
    for (int64_t nb = lo; nb < hi; ++nb) {
      const int64_t n = nb / Bh, by = nb % Bh;
      bool* orow = o + nb * Bw;
      for (int64_t oy = by * b; oy < std::min((by + 1) * b, Ho); ++oy) {
        std::fill(s.begin(), s.end(), 0.f);
        for (int64_t ky = 0; ky < kh; ++ky) {
          const int64_t iy = oy * sh - ph + ky * dh;
          if (iy < 0 || iy >= H) continue;
          const float* src = rows.data() + (n * H + iy) * Wo;
          for (int64_t ox = 0; ox < Wo; ++ox) s[ox] += src[ox];
        }
        for (int64_t ox = 0; ox < Wo; ++ox)
          if (s[ox] * sc > thr) orow[ox / b] = true;
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// Scatter-add of per-position results into z (disjoint blocks: no races).
// ---------------------------------------------------------------------------

// out is (M, Co) row-major: row m holds the Co results of output position m.
void scatter_add(at::Tensor& z, const std::vector<Block>& blocks, const float* out) {
  const int64_t Co = z.size(1);
  const Strides zs(z);
  float* zp = z.data_ptr<float>();
  at::parallel_for(0, blocks.size(), 1, [&](int64_t lo, int64_t hi) {
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

// ---------------------------------------------------------------------------
// Gathers (im2col of the active positions only) + GEMM.
// ---------------------------------------------------------------------------

// Receptive field of one output block, (P_h, P_w, Ci) channel-minor, zeros
// where the kernel reads padding. NCHW residuals are transposed patch by patch
// (only the halo of the active blocks, not the whole tensor) so the im2col
// below can copy whole channel vectors in either layout.
void load_patch(const float* rp, const Strides& rs, int64_t Ci, int64_t H, int64_t W, int64_t n, int64_t iy0,
                int64_t ix0, int64_t ph, int64_t pw, std::vector<float>& buf) {
  buf.resize(ph * pw * Ci);
  float* dst = buf.data();
  if (iy0 < 0 || ix0 < 0 || iy0 + ph > H || ix0 + pw > W) std::fill(buf.begin(), buf.end(), 0.f);
  const int64_t y_lo = std::max<int64_t>(0, -iy0), y_hi = std::min(ph, H - iy0);
  const int64_t x_lo = std::max<int64_t>(0, -ix0), x_hi = std::min(pw, W - ix0);
  for (int64_t c = 0; c < Ci; ++c)
    for (int64_t py = y_lo; py < y_hi; ++py) {
      const float* src = rp + n * rs.n + c * rs.c + (iy0 + py) * rs.h + ix0 * rs.w;
      for (int64_t px = x_lo; px < x_hi; ++px) dst[(py * pw + px) * Ci + c] = src[px * rs.w];
    }
}

// im2col of the active positions only -> cols (G, M, T*Cg), columns ordered
// (tap, channel-in-group) so every tap copies Cg contiguous floats; then one
// GEMM (G == 1) or batched GEMM against the weight packed as (G, T*Cg, Cog).
// Returns out (G, M, Cog).
at::Tensor gather_gemm(const at::Tensor& r, const at::Tensor& wpack, const std::vector<Block>& blocks,
                       const Conv& cv, int64_t M) {
  const int64_t H = r.size(2), W = r.size(3), Ci = r.size(1), G = cv.groups, Cg = Ci / G;
  const int64_t T = cv.kh * cv.kw, Kg = T * Cg;
  const Strides rs(r);
  const bool direct = rs.c == 1 || Ci == 1;  // channel vectors already contiguous
  const float* rp = r.data_ptr<float>();
  at::Tensor cols = at::empty({G, M, Kg}, r.options().memory_format(at::MemoryFormat::Contiguous));
  float* cp = cols.data_ptr<float>();
  at::parallel_for(0, blocks.size(), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> patch;
    for (int64_t i = lo; i < hi; ++i) {
      const Block& bl = blocks[i];
      const int64_t iy0 = bl.oy0 * cv.sh - cv.ph, ix0 = bl.ox0 * cv.sw - cv.pw;
      const int64_t ph = (bl.oy1 - bl.oy0 - 1) * cv.sh + (cv.kh - 1) * cv.dh + 1;
      const int64_t pw = (bl.ox1 - bl.ox0 - 1) * cv.sw + (cv.kw - 1) * cv.dw + 1;
      if (!direct) load_patch(rp, rs, Ci, H, W, bl.n, iy0, ix0, ph, pw, patch);
      int64_t m = bl.m0;
      for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
        for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox, ++m)
          for (int64_t ky = 0; ky < cv.kh; ++ky) {
            const int64_t iy = oy * cv.sh - cv.ph + ky * cv.dh;
            for (int64_t kx = 0; kx < cv.kw; ++kx) {
              const int64_t ix = ox * cv.sw - cv.pw + kx * cv.dw, t = ky * cv.kw + kx;
              const float* src;
              if (!direct)
                src = patch.data() + ((iy - iy0) * pw + (ix - ix0)) * Ci;
              else if (iy >= 0 && iy < H && ix >= 0 && ix < W)
                src = rp + bl.n * rs.n + iy * rs.h + ix * rs.w;
              else
                src = nullptr;
              for (int64_t g = 0; g < G; ++g) {
                float* dst = cp + (g * M + m) * Kg + t * Cg;
                if (src)
                  std::memcpy(dst, src + g * Cg, Cg * sizeof(float));
                else
                  std::memset(dst, 0, Cg * sizeof(float));
              }
            }
          }
    }
  });
  if (G == 1) return at::mm(cols[0], wpack[0]).unsqueeze(0);
  return at::bmm(cols, wpack);
}

// ---------------------------------------------------------------------------
// Depthwise / one-input-channel-per-group convs: direct loops, no GEMM.
// ---------------------------------------------------------------------------

// channels_last r, weight packed (T, Co). Co = Ci * mult.
void depthwise_channels_last(at::Tensor& z, const at::Tensor& r, const at::Tensor& wpack,
                             const std::vector<Block>& blocks, const Conv& cv) {
  const int64_t H = r.size(2), W = r.size(3), Co = z.size(1), mult = Co / r.size(1);
  const Strides rs(r), zs(z);
  const float* rp = r.data_ptr<float>();
  const float* wp = wpack.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  at::parallel_for(0, blocks.size(), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(Co);
    for (int64_t i = lo; i < hi; ++i) {
      const Block& bl = blocks[i];
      for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
        for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) {
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t ky = 0; ky < cv.kh; ++ky) {
            const int64_t iy = oy * cv.sh - cv.ph + ky * cv.dh;
            if (iy < 0 || iy >= H) continue;
            for (int64_t kx = 0; kx < cv.kw; ++kx) {
              const int64_t ix = ox * cv.sw - cv.pw + kx * cv.dw;
              if (ix < 0 || ix >= W) continue;
              const float* src = rp + bl.n * rs.n + iy * rs.h + ix * rs.w;
              const float* wt = wp + (ky * cv.kw + kx) * Co;
              if (mult == 1)
                for (int64_t c = 0; c < Co; ++c) acc[c] += wt[c] * src[c];
              else
                for (int64_t c = 0; c < Co; ++c) acc[c] += wt[c] * src[c / mult];
            }
          }
          float* dst = zp + bl.n * zs.n + oy * zs.h + ox * zs.w;
          for (int64_t c = 0; c < Co; ++c) dst[c * zs.c] += acc[c];
        }
    }
  });
}

// NCHW r, weight packed (Co, T).
void depthwise_nchw(at::Tensor& z, const at::Tensor& r, const at::Tensor& wpack, const std::vector<Block>& blocks,
                    const Conv& cv) {
  const int64_t H = r.size(2), W = r.size(3), Co = z.size(1), mult = Co / r.size(1), T = cv.kh * cv.kw;
  const Strides rs(r), zs(z);
  const float* rp = r.data_ptr<float>();
  const float* wp = wpack.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  at::parallel_for(0, Co, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(cv.b);
    for (int64_t co = lo; co < hi; ++co) {
      const int64_t ci = co / mult;
      for (const Block& bl : blocks) {
        const int64_t width = bl.ox1 - bl.ox0;
        for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy) {
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t ky = 0; ky < cv.kh; ++ky) {
            const int64_t iy = oy * cv.sh - cv.ph + ky * cv.dh;
            if (iy < 0 || iy >= H) continue;
            const float* src = rp + bl.n * rs.n + ci * rs.c + iy * rs.h;
            for (int64_t kx = 0; kx < cv.kw; ++kx) {
              const float wv = wp[co * T + ky * cv.kw + kx];
              for (int64_t j = 0; j < width; ++j) {
                const int64_t ix = (bl.ox0 + j) * cv.sw - cv.pw + kx * cv.dw;
                if (ix >= 0 && ix < W) acc[j] += wv * src[ix];
              }
            }
          }
          float* dst = zp + bl.n * zs.n + co * zs.c + oy * zs.h;
          for (int64_t j = 0; j < width; ++j) dst[(bl.ox0 + j) * zs.w] += acc[j];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Entry point.
// ---------------------------------------------------------------------------

enum Kind : int64_t { kGemm = 0, kDepthwiseChannelsLast = 1, kDepthwiseNchw = 2 };

// z += upsample(mask) * conv(r, w) computing only the active blocks.
// Returns the number of recomputed output positions (over the batch), or -1
// without touching z when that number exceeds max_rows (the caller then runs
// the dense path: the crossover decision costs no extra pass over the mask).
int64_t block_sparse_accumulate_(at::Tensor& z, const at::Tensor& r, const at::Tensor& wpack, const at::Tensor& mask,
                                 c10::IntArrayRef geom, int64_t kind, int64_t max_rows) {
  const Conv cv = parse_conv(geom);
  check_dense_fp32(z, "z");
  check_dense_fp32(r, "r");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3, "skip_conv: mask must be bool (N, Hb, Wb)");
  TORCH_CHECK(wpack.is_contiguous() && wpack.scalar_type() == at::kFloat, "skip_conv: packed weight must be fp32");
  int64_t M = 0;
  const std::vector<Block> blocks = list_blocks(mask, cv, &M);
  if (M > max_rows) return -1;
  if (M == 0) return 0;
  switch (kind) {
    case kGemm: {
      const at::Tensor out = gather_gemm(r, wpack, blocks, cv, M);  // (G, M, Cog)
      // (G, M, Cog) -> (M, Co): free when G == 1
      const at::Tensor flat = cv.groups == 1 ? out : out.permute({1, 0, 2}).contiguous();
      scatter_add(z, blocks, flat.data_ptr<float>());
      break;
    }
    case kDepthwiseChannelsLast:
      depthwise_channels_last(z, r, wpack, blocks, cv);
      break;
    case kDepthwiseNchw:
      depthwise_nchw(z, r, wpack, blocks, cv);
      break;
    default:
      TORCH_CHECK(false, "skip_conv: unknown kernel kind ", kind);
  }
  return M;
}

}  // namespace

TORCH_LIBRARY(gatesearch_skipconv, m) {
  m.def("gate_block_mask(Tensor r, int[] geometry, float threshold, float scale) -> Tensor");
  m.def(
      "block_sparse_accumulate_(Tensor(a!) z, Tensor r, Tensor wpack, Tensor mask, int[] geometry, int kind, "
      "int max_rows) -> int");
}

TORCH_LIBRARY_IMPL(gatesearch_skipconv, CPU, m) {
  m.impl("gate_block_mask", &gate_block_mask);
  m.impl("block_sparse_accumulate_", &block_sparse_accumulate_);
}
