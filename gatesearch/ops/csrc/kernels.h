// Shared pieces of the block-sparse Skip-Conv kernels (Skip-Convolutions,
// Eq. 3, 5, 7 and "Structured Sparsity", Sec. 3.2.2): the conv geometry, the
// output blocks and the input halos they read, the residual operand, per-block
// references, 16-lane vector helpers, and the functions one file offers another.
//
// Layouts: tensors are fp32, either NCHW-contiguous or channels_last (the
// Python side guarantees one of the two). Geometry arrives as a flat int list
// whose order is fixed by gatesearch/ops/geometry.py (ConvGeometry.ints).

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

namespace gs {

// ---------------------------------------------------------------------------
// Threads and vectors.
// ---------------------------------------------------------------------------

// Items per parallel task so each task moves >= kTaskFloats floats: below
// that, waking the second thread (and risking a stall at the barrier when the
// machine is busy) costs more than the work.
constexpr int64_t kTaskFloats = 32768;

inline int64_t grain(int64_t floats_per_item) {
  return std::max<int64_t>(1, kTaskFloats / std::max<int64_t>(1, floats_per_item));
}

constexpr int64_t kLanes = 16;

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

inline f32x16 abs16(f32x16 v) { return v < 0 ? -v : v; }

// s + v[0] + v[1] + ... + v[15], in that order
inline float add_lanes(float s, f32x16 v) {
  for (int j = 0; j < 16; ++j) s += v[j];
  return s;
}

// sum_i a[i] * b[i]
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  f32x16 acc = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  return n >= 16 ? add_lanes(s, acc) : s;
}

// sum_i |a[i] - b[i]| (b may be null: sum_i |a[i]|)
inline float abs_diff_sum(const float* __restrict a, const float* __restrict b, int64_t n) {
  f32x16 acc = {};
  int64_t i = 0;
  float s = 0.f;
  if (b) {
    for (; i + 16 <= n; i += 16) acc += abs16(load16(a + i) - load16(b + i));
    for (; i < n; ++i) s += std::fabs(a[i] - b[i]);
  } else {
    for (; i + 16 <= n; i += 16) acc += abs16(load16(a + i));
    for (; i < n; ++i) s += std::fabs(a[i]);
  }
  return n >= 16 ? add_lanes(s, acc) : s;
}

// out[i] = |a[i] - b[i]| (b may be null: |a[i]|)
inline void abs_diff(const float* __restrict a, const float* __restrict b, int64_t n, float* __restrict out) {
  int64_t i = 0;
  if (b) {
    for (; i + 16 <= n; i += 16) store16(out + i, abs16(load16(a + i) - load16(b + i)));
    for (; i < n; ++i) out[i] = std::fabs(a[i] - b[i]);
  } else {
    for (; i + 16 <= n; i += 16) store16(out + i, abs16(load16(a + i)));
    for (; i < n; ++i) out[i] = std::fabs(a[i]);
  }
}

// ---------------------------------------------------------------------------
// Where a frame's time goes (FramePlan.profile): seconds per kind of work.
// ---------------------------------------------------------------------------

struct Profile {
  double gate = 0, fused = 0, gather = 0, gemm = 0, scatter = 0, depthwise = 0, dense = 0, map = 0, pointwise = 0,
         pool = 0, frame_in = 0, prev = 0;
};

extern Profile* profile;  // set while a profiled frame runs, else null (the timers then cost a branch)

// Adds the lifetime of this object to one field of the profile, when profiling.
class Timer {
 public:
  explicit Timer(double Profile::*field) : slot_(profile ? &(profile->*field) : nullptr) {
    if (slot_) t0_ = std::chrono::steady_clock::now();
  }
  ~Timer() {
    if (slot_) *slot_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

 private:
  double* slot_;
  std::chrono::steady_clock::time_point t0_;
};

// ---------------------------------------------------------------------------
// Tensors.
// ---------------------------------------------------------------------------

inline bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_dense_fp32(const at::Tensor& t, const char* name);

// Element strides of a 4-D (N, C, H, W) tensor, whatever its memory format.
struct Strides {
  int64_t n, c, h, w;
  explicit Strides(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// A 4-D fp32 input read by a conv: x itself, or the residual x - prev when
// prev is given (same shape and strides: the pair is subtracted on the fly,
// so a full-frame residual is never written).
struct Input {
  const float* x;
  const float* prev;  // null: x is the operand
  Strides s;
  int64_t N, C, H, W;
  Input(const at::Tensor& t, const float* prev_ = nullptr)
      : x(t.data_ptr<float>()), prev(prev_), s(t), N(t.size(0)), C(t.size(1)), H(t.size(2)), W(t.size(3)) {}
};

// The data of an optional r_prev, checked against r (null when absent).
const float* prev_ptr(const at::Tensor& r, const c10::optional<at::Tensor>& prev);

// ---------------------------------------------------------------------------
// Geometry: output blocks and the input halos they read.
// ---------------------------------------------------------------------------

// One output block of one stream: output rows [oy0, oy1) x cols [ox0, ox1).
// Its positions occupy rows m0 .. m0 + area of a gathered matrix, row-major.
struct Block {
  int64_t n, oy0, oy1, ox0, ox1, m0;
  int64_t area() const { return (oy1 - oy0) * (ox1 - ox0); }
};

// The input rows and columns one block reads: ph x pw from (iy0, ix0), which may lie in the padding.
struct Halo {
  int64_t iy0, ix0, ph, pw;
};

inline int64_t halo_len(int64_t b, int64_t k, int64_t s, int64_t d) { return (b - 1) * s + (k - 1) * d + 1; }

// A conv with b x b output blocks: kernel, stride, padding, dilation, groups,
// block size and output size as ConvGeometry.ints() lists them, plus the grid.
struct Geometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, groups, b, Ho, Wo;
  int64_t Bh, Bw;  // block grid: ceil(Ho / b) x ceil(Wo / b)

  // [kh, kw, sh, sw, ph, pw, dh, dw, groups, block, Ho, Wo]
  static Geometry parse(c10::IntArrayRef g);
  // Only the block grid of an output (Ho, Wo) in b x b blocks: for kernels that never read the input.
  static Geometry grid(int64_t block, int64_t Ho, int64_t Wo);

  int64_t taps() const { return kh * kw; }
  int64_t blocks_per_stream() const { return Bh * Bw; }
  // Floats per block-reference slot: the halo of a full block times the channels.
  int64_t slot(int64_t C) const { return halo_len(b, kh, sh, dh) * halo_len(b, kw, sw, dw) * C; }

  // Block (by, bx) of stream n, clipped to the output.
  Block block(int64_t n, int64_t by, int64_t bx, int64_t m0 = 0) const {
    const int64_t oy0 = by * b, ox0 = bx * b;
    return {n, oy0, std::min(oy0 + b, Ho), ox0, std::min(ox0 + b, Wo), m0};
  }
  int64_t cell(const Block& bl) const { return (bl.n * Bh + bl.oy0 / b) * Bw + bl.ox0 / b; }

  Halo halo(const Block& bl) const {
    return {bl.oy0 * sh - ph, bl.ox0 * sw - pw, (bl.oy1 - bl.oy0 - 1) * sh + (kh - 1) * dh + 1,
            (bl.ox1 - bl.ox0 - 1) * sw + (kw - 1) * dw + 1};
  }

  void check_mask(const at::Tensor& mask, int64_t N, const char* who) const;
};

// The active blocks of a bool (N, Bh, Bw) mask, rows numbered in order; *rows = their output positions.
std::vector<Block> list_blocks(const at::Tensor& mask, const Geometry& g, int64_t* rows);

// fn(block, scratch) for every block of the grid (or only those set in mask), in parallel.
template <typename F>
void for_blocks(const Geometry& g, int64_t N, const bool* mask, int64_t floats_per_block, F&& fn) {
  at::parallel_for(0, N * g.Bh * g.Bw, grain(floats_per_block), [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch;
    for (int64_t i = lo; i < hi; ++i) {
      if (mask && !mask[i]) continue;
      fn(g.block(i / (g.Bh * g.Bw), (i / g.Bw) % g.Bh, i % g.Bw), scratch);
    }
  });
}

// ---------------------------------------------------------------------------
// Halos and per-block references (block_ref.cpp).
// ---------------------------------------------------------------------------

// The halo of one block, (ph, pw, C) channel-minor, zeros where the conv reads padding; the residual when
// in.prev is set. Resizes buf to fit.
void load_patch(const Input& in, int64_t n, const Halo& h, std::vector<float>& buf);

// The halo of x for one block into dst (ph * pw * C floats), channel-minor, zeros in the padding.
Halo read_halo(const Input& x, const Block& bl, const Geometry& g, float* dst);

// Whether the input rows and columns one block reads hold a changed position (changed: bool (N, H, W)).
bool halo_changed(const bool* changed, int64_t H, int64_t W, const Block& bl, const Geometry& g);

// Whether a block's residual against its reference halo ref (channel-minor, as read_halo writes it), read straight
// from a channels_last x, sums to so far below thr (times sc) over the whole halo that no output of the block can
// exceed the threshold (block_fires would stop at its early exit): then the gate need neither copy the halo nor
// form the residual. False when that does not hold for certain, or for other layouts.
bool halo_quiet(const Input& x, const Block& bl, const Geometry& g, const float* ref, float thr, float sc);

// Per-block references (the "block" reference mode): every output block keeps
// the input halo it was last computed from, N*Bh*Bw slots of P_h*P_w*Ci floats,
// P = (b - 1) * s + (k - 1) * d + 1; edge blocks use the leading ph*pw*Ci
// floats of their slot, channel-minor (ph, pw, Ci) like the gather's patches
// (fast with channels_last x: whole channel vectors). The residual of a block
// is then x - (its own last input), so changes below the gate's threshold
// accumulate until they count instead of being dropped frame after frame.
struct BlockRef {
  float* data = nullptr;
  int64_t slot = 0;
  const Geometry* g = nullptr;
  float* at(const Block& bl) const { return data + g->cell(bl) * slot; }
};

BlockRef block_ref(const at::Tensor& ref, const Geometry& g, const at::Tensor& x);

// patch <- patch - ref, ref <- old patch: the block's residual, and its new reference.
inline void diff_and_refresh(float* __restrict patch, float* __restrict ref, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = patch[i];
    patch[i] = v - ref[i];
    ref[i] = v;
  }
}

// ---------------------------------------------------------------------------
// Conv steps on the active blocks (gather_gemm.cpp, depthwise.cpp).
// ---------------------------------------------------------------------------

// z += conv(in, w) on the blocks (GEMM path: im2col of the active positions, one GEMM, scatter-add).
void gather_gemm_scatter(at::Tensor& z, const at::Tensor& r, const float* pp, const BlockRef* ref,
                         const at::Tensor& wpack, const at::Tensor& onednn, const std::vector<Block>& blocks,
                         const Geometry& g, int64_t M);

// z += conv(in, w) on the blocks for convs with one input channel per group (direct loops, no GEMM).
void depthwise(at::Tensor& z, const at::Tensor& r, const float* pp, const BlockRef* ref, const at::Tensor& wpack,
               const std::vector<Block>& blocks, const Geometry& g);

// The outputs of one block of a depthwise conv from its residual halo (channel-minor, C channels), added into z
// (channels_last, Co = C * mult channels). acc: Co floats of scratch.
void depthwise_block(const float* halo, const Halo& h, int64_t C, const Block& bl, const Geometry& g,
                     const float* wpack, int64_t Co, float* zp, const Strides& zs, float* acc);

// A GEMM weight (K, N) in panels of 16 output channels, (panels, K, 16), zero-padded past N: what the
// register-blocked block kernel streams.
struct PanelWeight {
  at::Tensor data;
  int64_t K = 0, N = 0, panels = 0;
};

PanelWeight pack_panels(const at::Tensor& wpack);  // from the (1, K, N) GEMM packing of ops/packing.py

// z += conv of one block from its residual halo (channel-minor, C channels; K = taps * C rows of w), output
// channels of panels [p0, p1) only (block_conv.cpp). Threads may share one block by splitting its panels.
void block_conv(const float* halo, const Halo& h, int64_t C, const Block& bl, const Geometry& g,
                const PanelWeight& w, float* zp, const Strides& zs, int64_t p0, int64_t p1);

// ---------------------------------------------------------------------------
// Gates (gate.cpp).
// ---------------------------------------------------------------------------

// Whether one output of the block sees scale * sum |x - old| over its support above threshold (Eq. 5 / 7): x and
// old are the block's halo (ph, pw, C) channel-minor (old null: x is the residual); scratch holds
// ph * pw * (C + 2) floats. With ``early_exit`` a block also needs its whole halo to sum above the threshold (every
// window sums a subset of it): tested after the windows, which most blocks fail, so the serial whole-halo sum runs
// only for blocks that would fire.
bool block_fires(const float* x, const float* old, const Halo& h, int64_t C, const Block& bl, const Geometry& g,
                 float thr, float sc, float* scratch, bool early_exit);

// Per-block scratch of a frame plan's conv step (one per thread).
struct Scratch {
  std::vector<float> x, r, work, acc;
};

// ---------------------------------------------------------------------------
// Changed-region passes of a stream (changes.cpp): channels_last, maps bool (N, H, W), null map = everywhere.
// ---------------------------------------------------------------------------

// out <- clamp(a (+ b), lo, hi) at the changed positions (ReLU: lo 0; ReLU6: hi 6; add: no clamp).
void clamp_positions(float* out, const float* a, const float* b, const bool* changed, int64_t positions, int64_t C,
                     float lo, float hi);

// A max-pool (dilation 1, floor mode, padding read as -inf) of an (N, C, H, W) input to (N, C, Ho, Wo).
struct PoolShape {
  int64_t N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw;
  struct Window {
    int64_t y0, y1, x0, x1;  // the input rows and columns under one output, clipped to the map
  };
  Window window(int64_t oy, int64_t ox) const {
    return {std::max<int64_t>(0, oy * sh - ph), std::min(H, oy * sh - ph + kh), std::max<int64_t>(0, ox * sw - pw),
            std::min(W, ox * sw - pw + kw)};
  }
};

// out_changed <- outputs whose window holds a changed input.
void max_pool_changes(bool* out_changed, const bool* changed, const PoolShape& s);
// out <- max-pool of x at the outputs set in out_changed.
void max_pool_positions(float* out, const float* x, const bool* out_changed, const PoolShape& s);
// (N, Bh, Bw) block mask -> (N, Ho, Wo) map of the positions in active blocks.
void block_positions_into(bool* out, const bool* mask, const Geometry& g, int64_t N);

}  // namespace gs
