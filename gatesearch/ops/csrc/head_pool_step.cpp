// The clip head's per-frame pooling as the last step of a native frame plan
// (frame.cpp): backbones/base.py's ``frame_pool`` — the deep features
// average-pooled to a grid x grid (PyTorch's adaptive bins) and max-pooled
// over the whole map, flattened into one (N, C * grid^2 + C) row per stream.
//
// Run in Python after the plan, these four small ops (pool, flatten, amax,
// cat) cost ~0.1 ms per ResNet-18 frame at 224²: the plan has just pushed
// their code and data out of the caches. Here they are one pass over a map
// that the last step has just written.

#include <cmath>
#include <limits>

#include "frame.h"

namespace gs {
namespace {

struct HeadPoolStep : Step {
  int64_t in = 0, out = 0, grid = 1;

  void run(std::vector<Slot>& slots, bool) override {
    const Timer timer(&Profile::pool);
    const Slot& x = slots[in];
    Slot& o = slots[out];
    const int64_t N = x.t.size(0), C = x.t.size(1), H = x.t.size(2), W = x.t.size(3), g = grid;
    const int64_t cells = g * g, D = C * cells + C;
    if (!o.t.defined() || o.t.size(0) != N || o.t.size(1) != D) o.t = at::empty({N, D}, x.t.options());
    o.mark_all();
    const Strides xs(x.t);
    const float* xp = x.t.data_ptr<float>();
    float* op = o.t.data_ptr<float>();
    std::vector<float> sum(C), top(C);
    for (int64_t n = 0; n < N; ++n) {
      float* row = op + n * D;
      std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
      for (int64_t i = 0; i < g; ++i) {
        const int64_t y0 = i * H / g, y1 = ((i + 1) * H + g - 1) / g;  // adaptive_avg_pool2d's bins
        for (int64_t j = 0; j < g; ++j) {
          const int64_t x0 = j * W / g, x1 = ((j + 1) * W + g - 1) / g;
          std::fill(sum.begin(), sum.end(), 0.0f);
          for (int64_t y = y0; y < y1; ++y)
            for (int64_t xx = x0; xx < x1; ++xx) {
              const float* p = xp + n * xs.n + y * xs.h + xx * xs.w;
              for (int64_t c = 0; c < C; ++c) sum[c] += p[c * xs.c];
            }
          const float area = static_cast<float>((y1 - y0) * (x1 - x0));
          for (int64_t c = 0; c < C; ++c) row[c * cells + i * g + j] = sum[c] / area;
        }
      }
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) {
          const float* p = xp + n * xs.n + y * xs.h + xx * xs.w;
          for (int64_t c = 0; c < C; ++c) {
            const float v = p[c * xs.c];
            if (v > top[c] || std::isnan(v)) top[c] = v;  // amax: a NaN wins and stays
          }
        }
      std::copy(top.begin(), top.end(), row + C * cells);
    }
  }
};

}  // namespace

std::unique_ptr<Step> head_pool_step(int64_t in, int64_t out, int64_t grid) {
  TORCH_CHECK(grid >= 1, "FramePlan: the head pool's grid must be at least 1, got ", grid);
  auto s = std::make_unique<HeadPoolStep>();
  s->in = in;
  s->out = out;
  s->grid = grid;
  return s;
}

}  // namespace gs
