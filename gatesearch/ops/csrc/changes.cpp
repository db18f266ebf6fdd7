// Changed-region kernels: elementwise layers of a block-reference stream that
// update only the positions whose inputs changed since the previous frame.
//
// A skip-conv in reference mode "block" changes its output z only in the
// blocks it recomputes; a ReLU, a residual add or a max-pool fed by such
// outputs can keep last frame's result and rewrite only the positions whose
// inputs changed (ops/changes.py tracks which those are, as a bool map
// (N, H, W) per tensor). Everything else on the stream reads whole tensors:
// in a ResNet-18 at 224x224 these passes cost as much as a third of the
// gated frame once the convs skip most of their work.
//
// Layout: fp32 tensors, channels_last-contiguous (a position's channels are
// one contiguous run), as skip-conv streams keep them.

#include <torch/library.h>

#include <limits>

#include "kernels.h"

namespace gs {

namespace {

void check_stream(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 &&
                  t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "changes: ", name, " must be a 4-D channels_last fp32 CPU tensor");
}

const bool* map_ptr(const at::Tensor& m, const at::Tensor& like, const char* name) {
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.dim() == 3 && m.is_contiguous() &&
                  m.size(0) == like.size(0) && m.size(1) == like.size(2) && m.size(2) == like.size(3),
              "changes: ", name, " must be a contiguous bool map (N, H, W) of its tensor");
  return m.data_ptr<bool>();
}

// fn(p) for every position p (flat n, h, w) set in the map (every position when m is null).
template <typename F>
void for_changed(const bool* m, int64_t positions, int64_t C, F&& fn) {
  at::parallel_for(0, positions, grain(C), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p)
      if (!m || m[p]) fn(p);
  });
}

}  // namespace

void clamp_positions(float* out, const float* a, const float* b, const bool* changed, int64_t positions, int64_t C,
                     float lo, float hi) {
  for_changed(changed, positions, C, [&](int64_t p) {
    const float* x = a + p * C;
    const float* y = b ? b + p * C : nullptr;
    float* o = out + p * C;
    if (y) {
      for (int64_t c = 0; c < C; ++c) o[c] = std::min(std::max(x[c] + y[c], lo), hi);
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = std::min(std::max(x[c], lo), hi);
    }
  });
}

void max_pool_positions(float* out, const float* x, const bool* out_changed, const PoolShape& s) {
  const int64_t C = s.C, H = s.H, W = s.W, Ho = s.Ho, Wo = s.Wo;
  for_changed(out_changed, s.N * Ho * Wo, C * s.kh * s.kw, [&](int64_t p) {
    const int64_t n = p / (Ho * Wo);
    const auto [y0, y1, x0, x1] = s.window((p / Wo) % Ho, p % Wo);
    float* o = out + p * C;
    std::fill(o, o + C, -std::numeric_limits<float>::infinity());
    for (int64_t iy = y0; iy < y1; ++iy)
      for (int64_t ix = x0; ix < x1; ++ix) {
        const float* v = x + ((n * H + iy) * W + ix) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = std::max(o[c], v[c]);
      }
  });
}

void max_pool_changes(bool* out_changed, const bool* changed, const PoolShape& s) {
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t oy = 0; oy < s.Ho; ++oy)
      for (int64_t ox = 0; ox < s.Wo; ++ox) {
        const auto [y0, y1, x0, x1] = s.window(oy, ox);
        bool any = false;
        for (int64_t iy = y0; iy < y1 && !any; ++iy)
          for (int64_t ix = x0; ix < x1 && !any; ++ix) any = changed[(n * s.H + iy) * s.W + ix];
        out_changed[(n * s.Ho + oy) * s.Wo + ox] = any;
      }
}

void block_positions_into(bool* out, const bool* mask, const Geometry& g, int64_t N) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t y = 0; y < g.Ho; ++y) {
      const bool* row = mask + (n * g.Bh + y / g.b) * g.Bw;
      bool* dst = out + (n * g.Ho + y) * g.Wo;
      for (int64_t bx = 0; bx < g.Bw; ++bx)  // runs of b positions per block: no division per position
        std::memset(dst + bx * g.b, row[bx], std::min(g.b, g.Wo - bx * g.b));
    }
}

namespace {

// out <- max(a (+ b), 0 if relu) at the positions set in ``changed``.
void pointwise_changed_(at::Tensor& out, const at::Tensor& a, const c10::optional<at::Tensor>& b_in,
                        const at::Tensor& changed, bool relu) {
  check_stream(out, "out");
  check_stream(a, "a");
  TORCH_CHECK(out.sizes() == a.sizes(), "changes: out and a differ in shape");
  const bool* m = map_ptr(changed, a, "changed");
  const float* bp = nullptr;
  if (b_in.has_value() && b_in->defined()) {
    check_stream(*b_in, "b");
    TORCH_CHECK(b_in->sizes() == a.sizes(), "changes: a and b differ in shape");
    bp = b_in->data_ptr<float>();
  }
  const float inf = std::numeric_limits<float>::infinity();
  clamp_positions(out.data_ptr<float>(), a.data_ptr<float>(), bp, m, changed.numel(), a.size(1), relu ? 0.f : -inf,
                  inf);
}

// Max-pool (kernel k, stride s, padding p read as -inf, dilation 1, floor mode) of x into out at the
// outputs whose window holds a changed input; returns the map of out's changes.
at::Tensor max_pool_changed_(at::Tensor& out, const at::Tensor& x, const at::Tensor& changed, c10::IntArrayRef kernel,
                             c10::IntArrayRef stride, c10::IntArrayRef padding) {
  check_stream(out, "out");
  check_stream(x, "x");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, "changes: max-pool takes 2-D geometry");
  const PoolShape s{x.size(0), x.size(1), x.size(2), x.size(3), out.size(2), out.size(3),
                    kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]};
  TORCH_CHECK(out.size(0) == s.N && out.size(1) == s.C && s.Ho == (s.H + 2 * s.ph - s.kh) / s.sh + 1 &&
                  s.Wo == (s.W + 2 * s.pw - s.kw) / s.sw + 1,
              "changes: out is not the max-pool of x");
  const bool* m = map_ptr(changed, x, "changed");
  at::Tensor out_changed = at::empty({s.N, s.Ho, s.Wo}, at::kBool);
  max_pool_changes(out_changed.data_ptr<bool>(), m, s);
  max_pool_positions(out.data_ptr<float>(), x.data_ptr<float>(), out_changed.data_ptr<bool>(), s);
  return out_changed;
}

// (N, Hb, Wb) block mask -> (N, Ho, Wo) map of the positions in active blocks.
at::Tensor block_positions(const at::Tensor& mask, int64_t block, int64_t Ho, int64_t Wo) {
  const Geometry g = Geometry::grid(block, Ho, Wo);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3 && mask.size(1) == g.Bh && mask.size(2) == g.Bw,
              "changes: mask does not match the block grid");
  const at::Tensor mc = mask.contiguous();
  at::Tensor out = at::empty({mask.size(0), Ho, Wo}, at::kBool);
  block_positions_into(out.data_ptr<bool>(), mc.data_ptr<bool>(), g, mask.size(0));
  return out;
}

}  // namespace
}  // namespace gs

TORCH_LIBRARY_FRAGMENT(gatesearch_skipconv, m) {
  m.def("pointwise_changed_(Tensor(a!) out, Tensor a, Tensor? b, Tensor changed, bool relu) -> ()");
  m.def("max_pool_changed_(Tensor(a!) out, Tensor x, Tensor changed, int[] kernel, int[] stride, int[] padding) -> Tensor");
  m.def("block_positions(Tensor mask, int block, int Ho, int Wo) -> Tensor");
}

TORCH_LIBRARY_IMPL(gatesearch_skipconv, CPU, m) {
  m.impl("pointwise_changed_", &gs::pointwise_changed_);
  m.impl("max_pool_changed_", &gs::max_pool_changed_);
  m.impl("block_positions", &gs::block_positions);
}
