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
//
// The residual r_t = x_t - x_{t-1} can be passed as the pair (x_t, x_{t-1})
// ("r" and "r_prev", same shape and strides): the gate and the gather then
// subtract on the fly, so the full-frame residual is never written and read
// back (at low density it is only read where a block is active).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
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

// Items per parallel task so each task moves >= kTaskFloats floats: below
// that, waking the second thread (and risking a stall at the barrier when the
// machine is busy) costs more than the work.
constexpr int64_t kTaskFloats = 32768;

int64_t grain(int64_t floats_per_item) { return std::max<int64_t>(1, kTaskFloats / std::max<int64_t>(1, floats_per_item)); }

// 16 floats as one value (GCC/Clang vector extension): one AVX-512 register,
// or two / four narrower ones. Explicit so the compiler keeps partial sums in
// registers instead of reshuffling a float[16] through memory.
typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

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

// The input rows and columns one block reads: ph x pw from (iy0, ix0), which may lie in the padding.
struct Halo {
  int64_t iy0, ix0, ph, pw;
};

Halo halo_of(const Block& bl, const Conv& cv) {
  return {bl.oy0 * cv.sh - cv.ph, bl.ox0 * cv.sw - cv.pw, (bl.oy1 - bl.oy0 - 1) * cv.sh + (cv.kh - 1) * cv.dh + 1,
          (bl.ox1 - bl.ox0 - 1) * cv.sw + (cv.kw - 1) * cv.dw + 1};
}

// Per-block references (the "block" reference mode): every output block keeps
// the input halo it was last computed from, N*Hb*Wb slots of P_h*P_w*Ci floats,
// P = (b - 1) * s + (k - 1) * d + 1; edge blocks use the leading ph*pw*Ci
// floats of their slot, channel-minor (ph, pw, Ci) like the gather's patches
// (fast with channels_last x: whole channel vectors). The residual of a block
// is then x - (its own last input), so changes below the gate's threshold
// accumulate until they count instead of being dropped frame after frame.
struct BlockRef {
  float* data = nullptr;
  int64_t slot = 0, Bh = 0, Bw = 0, b = 1;
  float* at(const Block& bl) const { return data + ((bl.n * Bh + bl.oy0 / b) * Bw + bl.ox0 / b) * slot; }
};

int64_t halo_len(int64_t b, int64_t k, int64_t s, int64_t d) { return (b - 1) * s + (k - 1) * d + 1; }

BlockRef block_ref(const at::Tensor& ref, const Conv& cv, const at::Tensor& x) {
  const int64_t N = x.size(0), Ci = x.size(1);
  TORCH_CHECK(ref.is_contiguous() && ref.scalar_type() == at::kFloat && ref.device().is_cpu(),
              "skip_conv: block reference must be a contiguous fp32 CPU tensor");
  BlockRef br;
  br.b = cv.b;
  br.Bh = (cv.Ho + cv.b - 1) / cv.b;
  br.Bw = (cv.Wo + cv.b - 1) / cv.b;
  br.slot = halo_len(cv.b, cv.kh, cv.sh, cv.dh) * halo_len(cv.b, cv.kw, cv.sw, cv.dw) * Ci;
  TORCH_CHECK(ref.numel() == N * br.Bh * br.Bw * br.slot, "skip_conv: block reference has the wrong size");
  br.data = ref.data_ptr<float>();
  return br;
}

// patch <- patch - ref, ref <- old patch: the block's residual, and its new reference.
inline void diff_and_refresh(float* __restrict patch, float* __restrict ref, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = patch[i];
    patch[i] = v - ref[i];
    ref[i] = v;
  }
}

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

// The residual operand: r itself, or r - prev when prev is given (same strides).
const float* prev_ptr(const at::Tensor& r, const c10::optional<at::Tensor>& prev) {
  if (!prev.has_value() || !prev->defined()) return nullptr;
  TORCH_CHECK(prev->device().is_cpu() && prev->scalar_type() == at::kFloat, "skip_conv: r_prev must be fp32 CPU");
  TORCH_CHECK(prev->sizes() == r.sizes() && prev->strides() == r.strides(),
              "skip_conv: r_prev must match r in shape and strides");
  return prev->data_ptr<float>();
}

// a[n, y, x] = sum_c |r[n, c, y, x] - prev[n, c, y, x]|  -> (N, H, W); prev may be null
void channel_abs_sum(const at::Tensor& r, const float* prev, float* a) {
  const int64_t N = r.size(0), C = r.size(1), HW = r.size(2) * r.size(3);
  const float* src = r.data_ptr<float>();
  if (is_channels_last(r)) {
    at::parallel_for(0, N * HW, grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float* p = src + i * C;
        const float* q = prev ? prev + i * C : nullptr;
        f32x16 acc = {};
        int64_t c = 0;
        float s = 0.f;
        if (q) {
          for (; c + 16 <= C; c += 16) {
            const f32x16 v = load16(p + c) - load16(q + c);
            acc += v < 0 ? -v : v;
          }
          for (; c < C; ++c) s += std::fabs(p[c] - q[c]);
        } else {
          for (; c + 16 <= C; c += 16) {
            const f32x16 v = load16(p + c);
            acc += v < 0 ? -v : v;
          }
          for (; c < C; ++c) s += std::fabs(p[c]);
        }
        if (C >= 16)
          for (int j = 0; j < 16; ++j) s += acc[j];
        a[i] = s;
      }
    });
  } else {
    constexpr int64_t kChunk = 512;  // positions per task: keeps the partial sums in L1
    const int64_t chunks = (HW + kChunk - 1) / kChunk;
    at::parallel_for(0, N * chunks, grain(C * kChunk), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n = t / chunks, i0 = (t % chunks) * kChunk, i1 = std::min(i0 + kChunk, HW);
        float* dst = a + n * HW;
        for (int64_t i = i0; i < i1; ++i) dst[i] = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          const float* p = src + (n * C + c) * HW;
          if (prev) {
            const float* q = prev + (n * C + c) * HW;
            for (int64_t i = i0; i < i1; ++i) dst[i] += std::fabs(p[i] - q[i]);
          } else {
            for (int64_t i = i0; i < i1; ++i) dst[i] += std::fabs(p[i]);
          }
        }
      }
    });
  }
}

// geometry: [kh, kw, sh, sw, ph, pw, dh, dw, block, Ho, Wo]
at::Tensor gate_block_mask(const at::Tensor& r_in, c10::IntArrayRef geom, double threshold, double scale,
                           const c10::optional<at::Tensor>& r_prev) {
  TORCH_CHECK(geom.size() == 11, "gate_block_mask: expected 11 geometry ints");
  check_dense_fp32(r_in, "r");
  const int64_t kh = geom[0], kw = geom[1], sh = geom[2], sw = geom[3], ph = geom[4], pw = geom[5];
  const int64_t dh = geom[6], dw = geom[7], b = geom[8], Ho = geom[9], Wo = geom[10];
  const int64_t N = r_in.size(0), H = r_in.size(2), W = r_in.size(3);
  const int64_t Bh = (Ho + b - 1) / b, Bw = (Wo + b - 1) / b;

  std::vector<float> a(N * H * W);
  channel_abs_sum(r_in, prev_ptr(r_in, r_prev), a.data());

  // Separable box filter over the dilated kernel support (zero padding).
  // Sums of non-negative floats are 0 only if every term is 0, so a zero
  // threshold keeps exactly the outputs that see a non-zero residual.
  std::vector<float> rows(N * H * Wo);  // horizontal window sums, (N, H, Wo)
  at::parallel_for(0, N * H, grain(Wo * kw), [&](int64_t lo, int64_t hi) {
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
  at::parallel_for(0, N * Bh, grain(b * Wo * kh), [&](int64_t lo, int64_t hi) {
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
  const int64_t area = blocks.empty() ? 1 : (blocks[0].oy1 - blocks[0].oy0) * (blocks[0].ox1 - blocks[0].ox0);
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

// ---------------------------------------------------------------------------
// Gathers (im2col of the active positions only) + GEMM.
// ---------------------------------------------------------------------------

// Receptive field of one output block, (P_h, P_w, Ci) channel-minor, zeros
// where the kernel reads padding. NCHW residuals are transposed patch by patch
// (only the halo of the active blocks, not the whole tensor) so the im2col
// below can copy whole channel vectors in either layout.
void load_patch(const float* rp, const float* pp, const Strides& rs, int64_t Ci, int64_t H, int64_t W, int64_t n,
                int64_t iy0, int64_t ix0, int64_t ph, int64_t pw, std::vector<float>& buf) {
  buf.resize(ph * pw * Ci);
  float* dst = buf.data();
  if (iy0 < 0 || ix0 < 0 || iy0 + ph > H || ix0 + pw > W) std::fill(buf.begin(), buf.end(), 0.f);
  const int64_t y_lo = std::max<int64_t>(0, -iy0), y_hi = std::min(ph, H - iy0);
  const int64_t x_lo = std::max<int64_t>(0, -ix0), x_hi = std::min(pw, W - ix0);
  // 16 channels at a time per patch row: the written cache lines stay in L1
  // while the 16 channel rows fill them.
  for (int64_t py = y_lo; py < y_hi; ++py)
    for (int64_t c0 = 0; c0 < Ci; c0 += 16)
      for (int64_t c = c0; c < std::min(c0 + 16, Ci); ++c) {
        const int64_t off = n * rs.n + c * rs.c + (iy0 + py) * rs.h + ix0 * rs.w;
        const float* src = rp + off;
        float* row = dst + py * pw * Ci + c;
        if (pp) {
          const float* old = pp + off;
          for (int64_t px = x_lo; px < x_hi; ++px) row[px * Ci] = src[px * rs.w] - old[px * rs.w];
        } else {
          for (int64_t px = x_lo; px < x_hi; ++px) row[px * Ci] = src[px * rs.w];
        }
      }
}

// im2col of the active positions only -> cols (G, M, T*Cg), columns ordered
// (tap, channel-in-group) so every tap copies Cg contiguous floats; then one
// GEMM (G == 1) or batched GEMM against the weight packed as (G, T*Cg, Cog).
// With ``onednn`` (the G == 1 weight reordered by mkldnn::_reorder_linear_weight)
// the GEMM is oneDNN's: at the few rows of a deep layer (M ~ 20, K = 4608) it
// runs ~1.4x faster than MKL's sgemm behind at::mm, most of all with the weight
// cold in cache. oneDNN builds a kernel per row count (~0.5 ms, then cached), so
// the rows are padded with zeros to one of 8 sizes per octave.
// Returns out (G, M, Cog).
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

at::Tensor gather_gemm(const at::Tensor& r, const float* pp, const BlockRef* ref, const at::Tensor& wpack,
                       const at::Tensor& onednn, const std::vector<Block>& blocks, const Conv& cv, int64_t M) {
  const int64_t H = r.size(2), W = r.size(3), Ci = r.size(1), G = cv.groups, Cg = Ci / G;
  const int64_t T = cv.kh * cv.kw, Kg = T * Cg;
  const Strides rs(r);
  const bool direct = (rs.c == 1 || Ci == 1) && !ref;  // channel vectors already contiguous
  const float* rp = r.data_ptr<float>();
  const bool use_onednn = onednn.defined() && G == 1;
  const int64_t rows = use_onednn ? bucket_rows(M) : M;
  at::Tensor cols = at::empty({G, rows, Kg}, r.options().memory_format(at::MemoryFormat::Contiguous));
  float* cp = cols.data_ptr<float>();
  if (rows > M) std::memset(cp + M * Kg, 0, (rows - M) * Kg * sizeof(float));
  at::parallel_for(0, blocks.size(), grain(cv.b * cv.b * T * Ci), [&](int64_t lo, int64_t hi) {
    std::vector<float> patch;
    for (int64_t i = lo; i < hi; ++i) {
      const Block& bl = blocks[i];
      const auto [iy0, ix0, ph, pw] = halo_of(bl, cv);
      if (!direct) load_patch(rp, pp, rs, Ci, H, W, bl.n, iy0, ix0, ph, pw, patch);
      if (ref) diff_and_refresh(patch.data(), ref->at(bl), ph * pw * Ci);
      int64_t m = bl.m0;
      for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
        for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox, ++m)
          for (int64_t ky = 0; ky < cv.kh; ++ky) {
            const int64_t iy = oy * cv.sh - cv.ph + ky * cv.dh;
            for (int64_t kx = 0; kx < cv.kw; ++kx) {
              const int64_t ix = ox * cv.sw - cv.pw + kx * cv.dw, t = ky * cv.kw + kx;
              const float *src = nullptr, *old = nullptr;
              if (!direct) {
                src = patch.data() + ((iy - iy0) * pw + (ix - ix0)) * Ci;
              } else if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
                const int64_t off = bl.n * rs.n + iy * rs.h + ix * rs.w;
                src = rp + off;
                if (pp) old = pp + off;
              }
              for (int64_t g = 0; g < G; ++g) {
                float* dst = cp + (g * M + m) * Kg + t * Cg;
                if (old) {
                  for (int64_t j = g * Cg; j < (g + 1) * Cg; ++j) dst[j - g * Cg] = src[j] - old[j];
                } else if (src) {
                  std::memcpy(dst, src + g * Cg, Cg * sizeof(float));
                } else {
                  std::memset(dst, 0, Cg * sizeof(float));
                }
              }
            }
          }
    }
  });
  if (use_onednn) return onednn_linear(cols[0], onednn).narrow(0, 0, M).unsqueeze(0);
  if (G == 1) return at::mm(cols[0], wpack[0]).unsqueeze(0);
  return at::bmm(cols, wpack);
}

// Bytes of the gathered matrix per GEMM: at low density everything is one
// GEMM; at high density the rows are split into near-equal chunks that stay in
// cache, which also bounds the scratch memory for big layers.
constexpr int64_t kChunkBytes = 1024 * 1024;

void gather_gemm_scatter(at::Tensor& z, const at::Tensor& r, const float* pp, const BlockRef* ref, const at::Tensor& wpack,
                         const at::Tensor& onednn, const std::vector<Block>& blocks, const Conv& cv, int64_t M) {
  const int64_t K = cv.kh * cv.kw * r.size(1);
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
      rows += (blocks[start].oy1 - blocks[start].oy0) * (blocks[start].ox1 - blocks[start].ox0);
    }
    const at::Tensor out = gather_gemm(r, pp, ref, wpack, onednn, part, cv, rows);  // (G, rows, Cog)
    // (G, rows, Cog) -> (rows, Co): free when G == 1
    const at::Tensor flat = cv.groups == 1 ? out : out.permute({1, 0, 2}).contiguous();
    scatter_add(z, part, flat.data_ptr<float>());
  }
}

// ---------------------------------------------------------------------------
// Depthwise / one-input-channel-per-group convs: direct loops, no GEMM.
// ---------------------------------------------------------------------------

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
  constexpr int64_t kLanes = 16;
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

// Depthwise (one input channel per group): direct loops, no GEMM. Weight
// packed (T, Co), Co = Ci * mult. channels_last residuals are read in place;
// NCHW ones go through the same per-block channel-minor patch as the GEMM path.
void depthwise(at::Tensor& z, const at::Tensor& r, const float* pp, const BlockRef* ref, const at::Tensor& wpack,
               const std::vector<Block>& blocks, const Conv& cv) {
  const int64_t H = r.size(2), W = r.size(3), Ci = r.size(1), Co = z.size(1), mult = Co / Ci;
  const Strides rs(r), zs(z);
  const bool direct = (rs.c == 1 || Ci == 1) && !pp && !ref;  // residual pairs and references go through the patch
  const float* rp = r.data_ptr<float>();
  const float* wp = wpack.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  at::parallel_for(0, blocks.size(), grain(cv.b * cv.b * cv.kh * cv.kw * Co), [&](int64_t lo, int64_t hi) {
    std::vector<float> patch, acc(Co);
    std::vector<const float*> in(cv.kh * cv.kw), w(cv.kh * cv.kw);
    for (int64_t i = lo; i < hi; ++i) {
      const Block& bl = blocks[i];
      const auto [iy0, ix0, ph, pw] = halo_of(bl, cv);
      if (!direct) load_patch(rp, pp, rs, Ci, H, W, bl.n, iy0, ix0, ph, pw, patch);
      if (ref) diff_and_refresh(patch.data(), ref->at(bl), ph * pw * Ci);
      for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
        for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) {
          int64_t taps = 0;
          for (int64_t ky = 0; ky < cv.kh; ++ky) {
            const int64_t iy = oy * cv.sh - cv.ph + ky * cv.dh;
            for (int64_t kx = 0; kx < cv.kw; ++kx) {
              const int64_t ix = ox * cv.sw - cv.pw + kx * cv.dw;
              if (!direct) {
                in[taps] = patch.data() + ((iy - iy0) * pw + (ix - ix0)) * Ci;
              } else if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
                in[taps] = rp + bl.n * rs.n + iy * rs.h + ix * rs.w;
              } else {
                continue;  // reads zero padding
              }
              w[taps++] = wp + (ky * cv.kw + kx) * Co;
            }
          }
          depthwise_point(in.data(), w.data(), taps, Co, mult, acc.data());
          add_channels(zp + bl.n * zs.n + oy * zs.h + ox * zs.w, zs.c, acc.data(), Co);
        }
    }
  });
}

// ---------------------------------------------------------------------------
// Dense path tail: z += out on the active blocks only (no float mask tensor).
// ---------------------------------------------------------------------------

void masked_add_(at::Tensor& z, const at::Tensor& out, const at::Tensor& mask, int64_t block, bool copy) {
  check_dense_fp32(z, "z");
  check_dense_fp32(out, "out");
  TORCH_CHECK(z.sizes() == out.sizes(), "masked_add_: z and out differ in shape");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3, "masked_add_: mask must be bool (N, Hb, Wb)");
  TORCH_CHECK(mask.size(0) == z.size(0) && mask.size(1) == (z.size(2) + block - 1) / block &&
                  mask.size(2) == (z.size(3) + block - 1) / block,
              "masked_add_: mask does not match the block grid of z");
  Conv cv{};
  cv.b = block;
  cv.Ho = z.size(2);
  cv.Wo = z.size(3);
  int64_t M = 0;
  const std::vector<Block> blocks = list_blocks(mask, cv, &M);
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

// ---------------------------------------------------------------------------
// Block references: fill them, refresh the active ones, gate against them.
// ---------------------------------------------------------------------------

template <typename F>
void for_blocks(const Conv& cv, int64_t N, const bool* mask, int64_t floats_per_block, F&& fn) {
  const int64_t Bh = (cv.Ho + cv.b - 1) / cv.b, Bw = (cv.Wo + cv.b - 1) / cv.b;
  at::parallel_for(0, N * Bh * Bw, grain(floats_per_block), [&](int64_t lo, int64_t hi) {
    std::vector<float> patch;
    for (int64_t i = lo; i < hi; ++i) {
      if (mask && !mask[i]) continue;
      const int64_t n = i / (Bh * Bw), by = (i / Bw) % Bh, bx = i % Bw;
      const int64_t oy0 = by * cv.b, ox0 = bx * cv.b;
      const Block bl{n, oy0, std::min(oy0 + cv.b, cv.Ho), ox0, std::min(ox0 + cv.b, cv.Wo), 0};
      fn(bl, patch);
    }
  });
}

// The halo of one block, channel-minor (zeros where the conv reads padding).
void read_halo(const float* xp, const Strides& xs, int64_t Ci, int64_t H, int64_t W, const Block& bl, const Conv& cv,
               float* dst, int64_t* ph_out, int64_t* pw_out) {
  const auto [iy0, ix0, ph, pw] = halo_of(bl, cv);
  *ph_out = ph;
  *pw_out = pw;
  const bool edge = iy0 < 0 || ix0 < 0 || iy0 + ph > H || ix0 + pw > W;
  if (edge) std::fill(dst, dst + ph * pw * Ci, 0.f);
  const int64_t y_lo = std::max<int64_t>(0, -iy0), y_hi = std::min(ph, H - iy0);
  const int64_t x_lo = std::max<int64_t>(0, -ix0), x_hi = std::min(pw, W - ix0);
  if (x_hi <= x_lo) return;
  for (int64_t py = y_lo; py < y_hi; ++py) {
    const float* row = xp + bl.n * xs.n + (iy0 + py) * xs.h + (ix0 + x_lo) * xs.w;
    if (xs.c == 1) {  // channels_last: a patch row is one contiguous run
      std::memcpy(dst + (py * pw + x_lo) * Ci, row, (x_hi - x_lo) * Ci * sizeof(float));
    } else {  // other strides (NCHW): correct, but a transpose
      for (int64_t px = 0; px < x_hi - x_lo; ++px)
        for (int64_t c = 0; c < Ci; ++c) dst[(py * pw + x_lo + px) * Ci + c] = row[px * xs.w + c * xs.c];
    }
  }
}

// ref[block] <- halo of x for every block (mask undefined) or the active ones.
void refresh_block_ref_(at::Tensor& ref_t, const at::Tensor& x, const c10::optional<at::Tensor>& mask_in,
                        c10::IntArrayRef geom) {
  const Conv cv = parse_conv(geom);
  check_dense_fp32(x, "x");
  const int64_t N = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3);
  const BlockRef ref = block_ref(ref_t, cv, x);
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) mask = mask_in->contiguous();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const Strides xs(x);
  const float* xp = x.data_ptr<float>();
  for_blocks(cv, N, mp, ref.slot, [&](const Block& bl, std::vector<float>&) {
    int64_t ph, pw;
    read_halo(xp, xs, Ci, H, W, bl, cv, ref.at(bl), &ph, &pw);
  });
}

// Whether the input rows and columns one block reads hold a changed position.
bool halo_changed(const bool* changed, int64_t H, int64_t W, const Block& bl, const Conv& cv) {
  const auto [iy0, ix0, ph, pw] = halo_of(bl, cv);
  const int64_t y1 = std::min(H, iy0 + ph), x1 = std::min(W, ix0 + pw);
  for (int64_t y = std::max<int64_t>(0, iy0); y < y1; ++y) {
    const bool* row = changed + (bl.n * H + y) * W;
    for (int64_t x = std::max<int64_t>(0, ix0); x < x1; ++x)
      if (row[x]) return true;
  }
  return false;
}

// Eq. 5 / 7 against the block references: a block is active when one of its
// outputs sees scale * sum |x - ref[block]| over its support above threshold.
//
// With ``changed`` (bool (N, H, W): the inputs that may differ from the previous
// frame's) a block whose halo holds no changed input is not read at all: its
// residual is the one it had last frame, which either stayed below the
// threshold or was zeroed by a refresh, so it cannot fire now.
at::Tensor gate_block_ref(const at::Tensor& x, const at::Tensor& ref_t, c10::IntArrayRef geom, double threshold,
                          double scale, const c10::optional<at::Tensor>& changed_in) {
  const Conv cv = parse_conv(geom);
  check_dense_fp32(x, "x");
  const int64_t N = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3);
  const BlockRef ref = block_ref(ref_t, cv, x);
  const Strides xs(x);
  const float* xp = x.data_ptr<float>();
  at::Tensor out = at::zeros({N, ref.Bh, ref.Bw}, at::kBool);
  bool* o = out.data_ptr<bool>();
  const float thr = static_cast<float>(threshold), sc = static_cast<float>(scale);
  const bool* changed = nullptr;
  if (changed_in.has_value() && changed_in->defined()) {
    const at::Tensor& m = *changed_in;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() && m.dim() == 3 && m.size(0) == N && m.size(1) == H &&
                    m.size(2) == W,
                "gate_block_ref: changed must be a contiguous bool map (N, H, W) of x");
    changed = m.data_ptr<bool>();
  }
  for_blocks(cv, N, nullptr, ref.slot, [&](const Block& bl, std::vector<float>& buf) {
    if (changed && !halo_changed(changed, H, W, bl, cv)) return;
    buf.resize(ref.slot + 2 * (ref.slot / std::max<int64_t>(1, Ci)));
    float* halo = buf.data();
    int64_t ph, pw;
    read_halo(xp, xs, Ci, H, W, bl, cv, halo, &ph, &pw);
    const int64_t P = ph * pw;
    float* a = halo + ref.slot;  // per halo position: sum_c |x - ref|
    float* rows = a + P;         // window sums along x: (ph, block width)
    const float* old = ref.at(bl);
    if (Ci < 16) {  // few channels (the RGB frame): |x - ref| over the whole halo in full vectors, then per position
      const int64_t n = P * Ci;
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        const f32x16 v = load16(halo + i) - load16(old + i);
        store16(halo + i, v < 0 ? -v : v);
      }
      for (; i < n; ++i) halo[i] = std::fabs(halo[i] - old[i]);
      for (int64_t p = 0; p < P; ++p) {
        float s = 0.f;
        for (int64_t c = 0; c < Ci; ++c) s += halo[p * Ci + c];
        a[p] = s;
      }
    } else {
      for (int64_t i = 0; i < P; ++i) {
        const float* p = halo + i * Ci;
        const float* q = old + i * Ci;
        f32x16 acc = {};
        int64_t c = 0;
        float s = 0.f;
        for (; c + 16 <= Ci; c += 16) {
          const f32x16 v = load16(p + c) - load16(q + c);
          acc += v < 0 ? -v : v;
        }
        for (; c < Ci; ++c) s += std::fabs(p[c] - q[c]);
        for (int j = 0; j < 16; ++j) s += acc[j];
        a[i] = s;
      }
    }
    float total = 0.f;  // every window of the block sums a subset of the halo: a quiet block ends here
    for (int64_t i = 0; i < P; ++i) total += a[i];
    const int64_t cell = (bl.n * ref.Bh + bl.oy0 / cv.b) * ref.Bw + bl.ox0 / cv.b;
    if (total * sc <= thr) return;  // o[cell] stays false
    const int64_t bw = bl.ox1 - bl.ox0;
    for (int64_t py = 0; py < ph; ++py)
      for (int64_t j = 0; j < bw; ++j) {
        float s = 0.f;
        for (int64_t kx = 0; kx < cv.kw; ++kx) s += a[py * pw + j * cv.sw + kx * cv.dw];
        rows[py * bw + j] = s;
      }
    bool active = false;
    for (int64_t i = 0; i < bl.oy1 - bl.oy0 && !active; ++i)
      for (int64_t j = 0; j < bw && !active; ++j) {
        float s = 0.f;
        for (int64_t ky = 0; ky < cv.kh; ++ky) s += rows[(i * cv.sh + ky * cv.dh) * bw + j];
        active = s * sc > thr;
      }
    o[cell] = active;
  });
  return out;
}

// Learned linear gate (Skip-Convolutions Eq. 8 at inference): a block is active
// when one of its outputs has f = bias + sum_{taps, c} w[tap][c] * (x - x_prev)
// over its support above 0. w is packed (kh, kw, Ci). Per block the residual
// halo (ph, pw, Ci) is formed once; with dilation 1 a kernel row then meets one
// contiguous run of kw*Ci halo floats, so f is kh dot products of that length.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  f32x16 acc = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  if (n >= 16)
    for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

at::Tensor gate_block_linear(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& wpack, double bias,
                             c10::IntArrayRef geom) {
  const Conv cv = parse_conv(geom);
  check_dense_fp32(x, "x");
  check_dense_fp32(x_prev, "x_prev");
  TORCH_CHECK(x.sizes() == x_prev.sizes() && x.strides() == x_prev.strides(),
              "gate_block_linear: x and x_prev differ in shape or layout");
  const int64_t N = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(wpack.is_contiguous() && wpack.scalar_type() == at::kFloat && wpack.numel() == cv.kh * cv.kw * Ci,
              "gate_block_linear: packed weight must be fp32 (kh*kw, Ci)");
  const int64_t Bh = (cv.Ho + cv.b - 1) / cv.b, Bw = (cv.Wo + cv.b - 1) / cv.b;
  const Strides xs(x);
  const float* xp = x.data_ptr<float>();
  const float* pp = x_prev.data_ptr<float>();
  const float* wp = wpack.data_ptr<float>();
  const float f0 = static_cast<float>(bias);
  const int64_t slot = halo_len(cv.b, cv.kh, cv.sh, cv.dh) * halo_len(cv.b, cv.kw, cv.sw, cv.dw) * Ci;
  at::Tensor out = at::zeros({N, Bh, Bw}, at::kBool);
  bool* o = out.data_ptr<bool>();
  for_blocks(cv, N, nullptr, slot, [&](const Block& bl, std::vector<float>& buf) {
    buf.resize(2 * slot);
    float* r = buf.data();
    float* old = r + slot;
    int64_t ph, pw;
    read_halo(xp, xs, Ci, H, W, bl, cv, r, &ph, &pw);
    read_halo(pp, xs, Ci, H, W, bl, cv, old, &ph, &pw);
    const int64_t n = ph * pw * Ci;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) store16(r + i, load16(r + i) - load16(old + i));
    for (; i < n; ++i) r[i] -= old[i];
    bool active = false;
    for (int64_t oy = bl.oy0; oy < bl.oy1 && !active; ++oy)
      for (int64_t ox = bl.ox0; ox < bl.ox1 && !active; ++ox) {
        float f = f0;
        for (int64_t ky = 0; ky < cv.kh; ++ky) {
          const float* row = r + (((oy - bl.oy0) * cv.sh + ky * cv.dh) * pw + (ox - bl.ox0) * cv.sw) * Ci;
          const float* w = wp + ky * cv.kw * Ci;
          if (cv.dw == 1) {
            f += dot(row, w, cv.kw * Ci);
          } else {
            for (int64_t kx = 0; kx < cv.kw; ++kx) f += dot(row + kx * cv.dw * Ci, w + kx * Ci, Ci);
          }
        }
        active = f > 0.f;
      }
    o[(bl.n * Bh + bl.oy0 / cv.b) * Bw + bl.ox0 / cv.b] = active;
  });
  return out;
}

// Output positions the mask recomputes (partial edge blocks by their real size), over the batch.
int64_t active_positions(const at::Tensor& mask, int64_t block, int64_t Ho, int64_t Wo) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3, "active_positions: mask must be bool (N, Hb, Wb)");
  TORCH_CHECK(mask.size(1) == (Ho + block - 1) / block && mask.size(2) == (Wo + block - 1) / block,
              "active_positions: mask does not match the block grid");
  Conv cv{};
  cv.b = block;
  cv.Ho = Ho;
  cv.Wo = Wo;
  int64_t M = 0;
  list_blocks(mask, cv, &M);
  return M;
}

// ---------------------------------------------------------------------------
// Entry point.
// ---------------------------------------------------------------------------

enum Kind : int64_t { kGemm = 0, kDepthwise = 1 };

// z += upsample(mask) * conv(r, w) computing only the active blocks.
// Returns the number of recomputed output positions (over the batch), or -1
// without touching z when that number exceeds max_rows (the caller then runs
// the dense path: the crossover decision costs no extra pass over the mask).
int64_t block_sparse_accumulate_(at::Tensor& z, const at::Tensor& r, const at::Tensor& wpack, const at::Tensor& mask,
                                 c10::IntArrayRef geom, int64_t kind, int64_t max_rows,
                                 const c10::optional<at::Tensor>& r_prev, const c10::optional<at::Tensor>& ref_in,
                                 const c10::optional<at::Tensor>& onednn_in) {
  const Conv cv = parse_conv(geom);
  check_dense_fp32(z, "z");
  check_dense_fp32(r, "r");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3, "skip_conv: mask must be bool (N, Hb, Wb)");
  TORCH_CHECK(wpack.is_contiguous() && wpack.scalar_type() == at::kFloat, "skip_conv: packed weight must be fp32");
  const int64_t N = r.size(0), Ci = r.size(1), Co = z.size(1);
  TORCH_CHECK(z.size(0) == N && mask.size(0) == N, "skip_conv: batch sizes of z, r and mask differ");
  TORCH_CHECK(z.size(2) == cv.Ho && z.size(3) == cv.Wo, "skip_conv: z does not match the conv output size");
  TORCH_CHECK(mask.size(1) == (cv.Ho + cv.b - 1) / cv.b && mask.size(2) == (cv.Wo + cv.b - 1) / cv.b,
              "skip_conv: mask does not match the block grid");
  TORCH_CHECK(cv.groups > 0 && Ci % cv.groups == 0 && Co % cv.groups == 0, "skip_conv: bad groups");
  TORCH_CHECK(wpack.numel() == Co * (Ci / cv.groups) * cv.kh * cv.kw, "skip_conv: packed weight has the wrong size");
  const float* pp = prev_ptr(r, r_prev);
  TORCH_CHECK(!(pp && ref_in.has_value()), "skip_conv: give r_prev or a block reference, not both");
  BlockRef ref;
  if (ref_in.has_value() && ref_in->defined()) ref = block_ref(*ref_in, cv, r);
  const BlockRef* rf = ref.data ? &ref : nullptr;
  int64_t M = 0;
  const std::vector<Block> blocks = list_blocks(mask, cv, &M);
  if (M > max_rows) return -1;
  if (M == 0) return 0;
  switch (kind) {
    case kGemm:
      gather_gemm_scatter(z, r, pp, rf, wpack, onednn_in.has_value() ? *onednn_in : at::Tensor(), blocks, cv, M);
      break;
    case kDepthwise:
      depthwise(z, r, pp, rf, wpack, blocks, cv);
      break;
    default:
      TORCH_CHECK(false, "skip_conv: unknown kernel kind ", kind);
  }
  return M;
}

}  // namespace

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
  m.impl("gate_block_mask", &gate_block_mask);
  m.impl("block_sparse_accumulate_", &block_sparse_accumulate_);
  m.impl("masked_add_", &masked_add_);
  m.impl("active_positions", &active_positions);
  m.impl("refresh_block_ref_", &refresh_block_ref_);
  m.impl("gate_block_ref", &gate_block_ref);
  m.impl("gate_block_linear", &gate_block_linear);
}

// A oneDNN-reordered weight is an MkldnnCPU tensor, which then decides the dispatch key.
TORCH_LIBRARY_IMPL(gatesearch_skipconv, MkldnnCPU, m) { m.impl("block_sparse_accumulate_", &block_sparse_accumulate_); }
