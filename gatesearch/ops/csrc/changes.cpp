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

namespace {

using gs::grain;

void check_stream(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 &&
                  t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "changes: ", name, " must be a 4-D channels_last fp32 CPU tensor");
}

const bool* map_ptr(const at::Tensor& m, const at::Tensor& like, const char* name) {
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.dim() == 3 && m.is_contiguous() && m.size(0) == like.size(0) &&
                  m.size(1) == like.size(2) && m.size(2) == like.size(3),
              "changes: ", name, " must be a contiguous bool map (N, H, W) of its tensor");
  return m.data_ptr<bool>();
}

// fn(p) for every position p (flat n, h, w) set in the map.
template <typename F>
void for_changed(const bool* m, int64_t positions, int64_t C, F&& fn) {
  at::parallel_for(0, positions, grain(C), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p)
      if (m[p]) fn(p);
  });
}

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
  const int64_t C = a.size(1);
  const float* ap = a.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lo = relu ? 0.f : -std::numeric_limits<float>::infinity();
  for_changed(m, changed.numel(), C, [&](int64_t p) {
    const float* x = ap + p * C;
    const float* y = bp ? bp + p * C : nullptr;
    float* o = op + p * C;
    if (y) {
      for (int64_t c = 0; c < C; ++c) o[c] = std::max(x[c] + y[c], lo);
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = std::max(x[c], lo);
    }
  });
}

// Max-pool (kernel k, stride s, padding p read as -inf, dilation 1, floor mode) of x into out at the
// outputs whose window holds a changed input; returns the map of out's changes.
at::Tensor max_pool_changed_(at::Tensor& out, const at::Tensor& x, const at::Tensor& changed, c10::IntArrayRef kernel,
                             c10::IntArrayRef stride, c10::IntArrayRef padding) {
  check_stream(out, "out");
  check_stream(x, "x");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, "changes: max-pool takes 2-D geometry");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = out.size(2), Wo = out.size(3);
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  TORCH_CHECK(out.size(0) == N && out.size(1) == C && Ho == (H + 2 * ph - kh) / sh + 1 && Wo == (W + 2 * pw - kw) / sw + 1,
              "changes: out is not the max-pool of x");
  const bool* m = map_ptr(changed, x, "changed");
  at::Tensor out_changed = at::zeros({N, Ho, Wo}, at::kBool);
  bool* om = out_changed.data_ptr<bool>();
  struct Window {
    int64_t y0, y1, x0, x1;  // the input rows and columns under one output, clipped to the map
  };
  const auto window = [&](int64_t oy, int64_t ox) {
    return Window{std::max<int64_t>(0, oy * sh - ph), std::min(H, oy * sh - ph + kh), std::max<int64_t>(0, ox * sw - pw),
                  std::min(W, ox * sw - pw + kw)};
  };
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oy = 0; oy < Ho; ++oy)
      for (int64_t ox = 0; ox < Wo; ++ox) {
        const auto [y0, y1, x0, x1] = window(oy, ox);
        bool any = false;
        for (int64_t iy = y0; iy < y1 && !any; ++iy)
          for (int64_t ix = x0; ix < x1 && !any; ++ix) any = m[(n * H + iy) * W + ix];
        om[(n * Ho + oy) * Wo + ox] = any;
      }
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for_changed(om, N * Ho * Wo, C * kh * kw, [&](int64_t p) {
    const int64_t n = p / (Ho * Wo);
    const auto [y0, y1, x0, x1] = window((p / Wo) % Ho, p % Wo);
    float* o = op + p * C;
    std::fill(o, o + C, -std::numeric_limits<float>::infinity());
    for (int64_t iy = y0; iy < y1; ++iy)
      for (int64_t ix = x0; ix < x1; ++ix) {
        const float* v = xp + ((n * H + iy) * W + ix) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = std::max(o[c], v[c]);
      }
  });
  return out_changed;
}

// (N, Hb, Wb) block mask -> (N, Ho, Wo) map of the positions in active blocks.
at::Tensor block_positions(const at::Tensor& mask, int64_t block, int64_t Ho, int64_t Wo) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3 && mask.size(1) == (Ho + block - 1) / block &&
                  mask.size(2) == (Wo + block - 1) / block,
              "changes: mask does not match the block grid");
  const at::Tensor mc = mask.contiguous();
  const int64_t N = mask.size(0), Bh = mask.size(1), Bw = mask.size(2);
  at::Tensor out = at::empty({N, Ho, Wo}, at::kBool);
  const bool* mp = mc.data_ptr<bool>();
  bool* o = out.data_ptr<bool>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t y = 0; y < Ho; ++y) {
      const bool* row = mp + (n * Bh + y / block) * Bw;
      for (int64_t x = 0; x < Wo; ++x) o[(n * Ho + y) * Wo + x] = row[x / block];
    }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gatesearch_skipconv, m) {
  m.def("pointwise_changed_(Tensor(a!) out, Tensor a, Tensor? b, Tensor changed, bool relu) -> ()");
  m.def("max_pool_changed_(Tensor(a!) out, Tensor x, Tensor changed, int[] kernel, int[] stride, int[] padding) -> Tensor");
  m.def("block_positions(Tensor mask, int block, int Ho, int Wo) -> Tensor");
}

TORCH_LIBRARY_IMPL(gatesearch_skipconv, CPU, m) {
  m.impl("pointwise_changed_", &pointwise_changed_);
  m.impl("max_pool_changed_", &max_pool_changed_);
  m.impl("block_positions", &block_positions);
}
