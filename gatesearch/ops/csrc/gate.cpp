// Gates: which output blocks a frame recomputes.
//
// Norm gates (Skip-Convolutions Eq. 5 / Eq. 7 with p = 1, max-pooled over
// b x b blocks): against the previous frame (gate_block_mask) or against each
// block's reference (gate_block_ref). The learned linear gate (Eq. 8 at
// inference): gate_block_linear.

#include <cmath>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "kernels.h"

namespace gs {
namespace {

// a[n, y, x] = sum_c |r[n, c, y, x] - prev[n, c, y, x]|  -> (N, H, W); prev may be null
void channel_abs_sum(const Input& r, bool channels_last, float* a) {
  const int64_t N = r.N, C = r.C, HW = r.H * r.W;
  if (channels_last) {
    at::parallel_for(0, N * HW, grain(C), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) a[i] = abs_diff_sum(r.x + i * C, r.prev ? r.prev + i * C : nullptr, C);
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
          const float* p = r.x + (n * C + c) * HW;
          if (r.prev) {
            const float* q = r.prev + (n * C + c) * HW;
            for (int64_t i = i0; i < i1; ++i) dst[i] += std::fabs(p[i] - q[i]);
          } else {
            for (int64_t i = i0; i < i1; ++i) dst[i] += std::fabs(p[i]);
          }
        }
      }
    });
  }
}

// a[p] = (d[3p] + d[3p + 1]) + d[3p + 2] for p < P: per-position channel sums of an RGB halo, 16 positions per
// vector (the same additions in the same order as the scalar loop, so the same sums).
void rgb_position_sums(const float* __restrict d, int64_t P, float* __restrict a) {
  int64_t p = 0;
#ifdef __AVX512F__
  // three vectors hold 16 positions (48 floats); two two-source permutes pick each channel's 16 values
  const __m512i a0 = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0, 0, 0, 0, 0);
  const __m512i b0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 20, 23, 26, 29);
  const __m512i a1 = _mm512_setr_epi32(1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 0, 0, 0, 0, 0);
  const __m512i b1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 18, 21, 24, 27, 30);
  const __m512i a2 = _mm512_setr_epi32(2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0, 0, 0, 0, 0, 0);
  const __m512i b2 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 19, 22, 25, 28, 31);
  for (; p + 16 <= P; p += 16) {
    const float* q = d + 3 * p;
    const __m512 v0 = _mm512_loadu_ps(q), v1 = _mm512_loadu_ps(q + 16), v2 = _mm512_loadu_ps(q + 32);
    const __m512 c0 = _mm512_permutex2var_ps(_mm512_permutex2var_ps(v0, a0, v1), b0, v2);
    const __m512 c1 = _mm512_permutex2var_ps(_mm512_permutex2var_ps(v0, a1, v1), b1, v2);
    const __m512 c2 = _mm512_permutex2var_ps(_mm512_permutex2var_ps(v0, a2, v1), b2, v2);
    _mm512_storeu_ps(a + p, _mm512_add_ps(_mm512_add_ps(c0, c1), c2));
  }
#endif
  for (; p < P; ++p) a[p] = (d[3 * p] + d[3 * p + 1]) + d[3 * p + 2];
}

}  // namespace

bool block_fires(const float* x, const float* old, const Halo& h, int64_t C, const Block& bl, const Geometry& g,
                 float thr, float sc, float* scratch, bool early_exit) {
  const int64_t P = h.ph * h.pw;
  float* a = scratch;     // per halo position: sum_c |x - old|
  float* rows = a + P;    // window sums along x: (ph, block width)
  if (C < 16) {  // few channels (the RGB frame): |x - old| over the whole halo in full vectors, then per position
    float* d = rows + P;  // |x - old|, (P, C)
    abs_diff(x, old, P * C, d);
    if (C == 3) {
      rgb_position_sums(d, P, a);
    } else {
      for (int64_t p = 0; p < P; ++p) {
        float s = 0.f;
        for (int64_t c = 0; c < C; ++c) s += d[p * C + c];
        a[p] = s;
      }
    }
  } else {
    for (int64_t i = 0; i < P; ++i) a[i] = abs_diff_sum(x + i * C, old ? old + i * C : nullptr, C);
  }
  // The windows first: most blocks fire in none, and then the whole-halo sum (a serial chain of P additions)
  // is not needed. The decision is the same as testing that sum first: a block fires when a window does and,
  // with ``early_exit``, the whole halo sums above the threshold too.
  const int64_t bw = bl.ox1 - bl.ox0;
  for (int64_t py = 0; py < h.ph; ++py)
    for (int64_t j = 0; j < bw; ++j) {
      float s = 0.f;
      for (int64_t kx = 0; kx < g.kw; ++kx) s += a[py * h.pw + j * g.sw + kx * g.dw];
      rows[py * bw + j] = s;
    }
  bool fires = false;
  for (int64_t i = 0; i < bl.oy1 - bl.oy0 && !fires; ++i)
    for (int64_t j = 0; j < bw; ++j) {
      float s = 0.f;
      for (int64_t ky = 0; ky < g.kh; ++ky) s += rows[(i * g.sh + ky * g.dh) * bw + j];
      if (s * sc > thr) {
        fires = true;
        break;
      }
    }
  if (!fires || !early_exit) return fires;
  float total = 0.f;
  for (int64_t i = 0; i < P; ++i) total += a[i];
  return total * sc > thr;
}

at::Tensor gate_block_mask(const at::Tensor& r_in, c10::IntArrayRef geom, double threshold, double scale,
                           const c10::optional<at::Tensor>& r_prev) {
  const Geometry g = Geometry::parse(geom);
  check_dense_fp32(r_in, "r");
  const Input r(r_in, prev_ptr(r_in, r_prev));
  const int64_t N = r.N, H = r.H, W = r.W, Wo = g.Wo;

  std::vector<float> a(N * H * W);
  channel_abs_sum(r, is_channels_last(r_in), a.data());

  // Separable box filter over the dilated kernel support (zero padding).
  // Sums of non-negative floats are 0 only if every term is 0, so a zero
  // threshold keeps exactly the outputs that see a non-zero residual.
  std::vector<float> rows(N * H * Wo);  // horizontal window sums, (N, H, Wo)
  at::parallel_for(0, N * H, grain(Wo * g.kw), [&](int64_t lo, int64_t hi) {
    for (int64_t ny = lo; ny < hi; ++ny) {
      const float* src = a.data() + ny * W;
      float* dst = rows.data() + ny * Wo;
      for (int64_t ox = 0; ox < Wo; ++ox) {
        float s = 0.f;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
          if (ix >= 0 && ix < W) s += src[ix];
        }
        dst[ox] = s;
      }
    }
  });

  at::Tensor out = at::zeros({N, g.Bh, g.Bw}, at::kBool);
  bool* o = out.data_ptr<bool>();
  const float thr = static_cast<float>(threshold), sc = static_cast<float>(scale);
  at::parallel_for(0, N * g.Bh, grain(g.b * Wo * g.kh), [&](int64_t lo, int64_t hi) {
    std::vector<float> s(Wo);
    for (int64_t nb = lo; nb < hi; ++nb) {
      const int64_t n = nb / g.Bh, by = nb % g.Bh;
      bool* orow = o + nb * g.Bw;
      for (int64_t oy = by * g.b; oy < std::min((by + 1) * g.b, g.Ho); ++oy) {
        std::fill(s.begin(), s.end(), 0.f);
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
          if (iy < 0 || iy >= H) continue;
          const float* src = rows.data() + (n * H + iy) * Wo;
          for (int64_t ox = 0; ox < Wo; ++ox) s[ox] += src[ox];
        }
        for (int64_t ox = 0; ox < Wo; ++ox)
          if (s[ox] * sc > thr) orow[ox / g.b] = true;
      }
    }
  });
  return out;
}

// Eq. 5 / 7 against the block references: a block is active when one of its
// outputs sees scale * sum |x - ref[block]| over its support above threshold.
//
// With ``changed`` (bool (N, H, W): the inputs that may differ from the previous
// frame's) a block whose halo holds no changed input is not read at all: its
// residual is the one it had last frame, which either stayed below the
// threshold or was zeroed by a refresh, so it cannot fire now.
at::Tensor gate_block_ref(const at::Tensor& x_in, const at::Tensor& ref_t, c10::IntArrayRef geom, double threshold,
                          double scale, const c10::optional<at::Tensor>& changed_in) {
  const Geometry g = Geometry::parse(geom);
  check_dense_fp32(x_in, "x");
  const Input x(x_in);
  const int64_t N = x.N, Ci = x.C, H = x.H, W = x.W;
  const BlockRef ref = block_ref(ref_t, g, x_in);
  at::Tensor out = at::zeros({N, g.Bh, g.Bw}, at::kBool);
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
  for_blocks(g, N, nullptr, ref.slot, [&](const Block& bl, std::vector<float>& buf) {
    if (changed && !halo_changed(changed, H, W, bl, g)) return;
    buf.resize(2 * ref.slot + 2 * (ref.slot / std::max<int64_t>(1, Ci)));
    float* halo = buf.data();
    const Halo h = read_halo(x, bl, g, halo);
    o[g.cell(bl)] = block_fires(halo, ref.at(bl), h, Ci, bl, g, thr, sc, halo + ref.slot, true);
  });
  return out;
}

// Learned gate (Skip-Convolutions Eq. 8 at inference, on the residual's magnitude:
// policies/gumbel.py says why): a block is active when one of its outputs has
// f = bias + sum_{taps, c} w[tap][c] * |x - x_prev| over its support above 0.
// w is packed (kh, kw, Ci). Per block the residual halo (ph, pw, Ci) is formed
// once; with dilation 1 a kernel row then meets one contiguous run of kw*Ci halo
// floats, so f is kh dot products of that length.
at::Tensor gate_block_linear(const at::Tensor& x_in, const at::Tensor& x_prev, const at::Tensor& wpack, double bias,
                             c10::IntArrayRef geom) {
  const Geometry g = Geometry::parse(geom);
  check_dense_fp32(x_in, "x");
  check_dense_fp32(x_prev, "x_prev");
  TORCH_CHECK(x_in.sizes() == x_prev.sizes() && x_in.strides() == x_prev.strides(),
              "gate_block_linear: x and x_prev differ in shape or layout");
  const Input x(x_in), old_x(x_prev);
  const int64_t Ci = x.C;
  TORCH_CHECK(wpack.is_contiguous() && wpack.scalar_type() == at::kFloat && wpack.numel() == g.kh * g.kw * Ci,
              "gate_block_linear: packed weight must be fp32 (kh*kw, Ci)");
  const float* wp = wpack.data_ptr<float>();
  const float f0 = static_cast<float>(bias);
  const int64_t slot = g.slot(Ci);
  at::Tensor out = at::zeros({x.N, g.Bh, g.Bw}, at::kBool);
  bool* o = out.data_ptr<bool>();
  for_blocks(g, x.N, nullptr, slot, [&](const Block& bl, std::vector<float>& buf) {
    buf.resize(2 * slot);
    float* r = buf.data();
    float* old = r + slot;
    const auto [iy0, ix0, ph, pw] = read_halo(x, bl, g, r);
    read_halo(old_x, bl, g, old);
    const int64_t n = ph * pw * Ci;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) store16(r + i, abs16(load16(r + i) - load16(old + i)));
    for (; i < n; ++i) r[i] = std::fabs(r[i] - old[i]);
    bool active = false;
    for (int64_t oy = bl.oy0; oy < bl.oy1 && !active; ++oy)
      for (int64_t ox = bl.ox0; ox < bl.ox1 && !active; ++ox) {
        float f = f0;
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          const float* row = r + (((oy - bl.oy0) * g.sh + ky * g.dh) * pw + (ox - bl.ox0) * g.sw) * Ci;
          const float* w = wp + ky * g.kw * Ci;
          if (g.dw == 1) {
            f += dot(row, w, g.kw * Ci);
          } else {
            for (int64_t kx = 0; kx < g.kw; ++kx) f += dot(row + kx * g.dw * Ci, w + kx * Ci, Ci);
          }
        }
        active = f > 0.f;
      }
    o[g.cell(bl)] = active;
  });
  return out;
}

// Output positions the mask recomputes (partial edge blocks by their real size), over the batch.
int64_t active_positions(const at::Tensor& mask, int64_t block, int64_t Ho, int64_t Wo) {
  const Geometry g = Geometry::grid(block, Ho, Wo);
  g.check_mask(mask, mask.size(0), "active_positions");
  int64_t M = 0;
  list_blocks(mask, g, &M);
  return M;
}

}  // namespace gs
