// Nearest upsampling as a step of a native frame plan (frame.cpp): HRNet's
// fusion brings each lower-resolution branch up to the branch it joins
// (F.interpolate(mode="nearest", size=...); backbones/hrnet.py). Output
// position (y, x) copies input position (iy[y], ix[x]); the index tables come
// from PyTorch's own nearest rule (policies/frame_step.py), so the values are
// the per-layer path's bit for bit. On a residual frame only the outputs whose
// source changed are copied, and they are the step's changed positions.

#include "frame.h"

namespace gs {
namespace {

struct UpsampleStep : Step {
  int64_t in = 0, out = 0;
  std::vector<int64_t> iy, ix;  // source row / column of each output row / column

  void run(std::vector<Slot>& slots, bool reference) override {
    const Timer timer(&Profile::pointwise);
    const Slot& x = slots[in];
    Slot& o = slots[out];
    const int64_t N = x.t.size(0), C = x.t.size(1), H = x.t.size(2), W = x.t.size(3);
    const int64_t Ho = iy.size(), Wo = ix.size();
    if (!o.t.defined() || o.t.size(0) != N || o.t.size(1) != C || o.t.size(2) != Ho || o.t.size(3) != Wo)
      o.t = at::empty({N, C, Ho, Wo}, x.t.options().memory_format(at::MemoryFormat::ChannelsLast));
    const bool* src_map = reference || x.all ? nullptr : x.map();
    bool* m = nullptr;
    if (src_map)
      m = o.fresh_map();
    else
      o.mark_all();
    const Strides xs(x.t), os(o.t);
    const float* xp = x.t.data_ptr<float>();
    float* op = o.t.data_ptr<float>();
    at::parallel_for(0, N * Ho, grain(Wo * C), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t n = r / Ho, y = r % Ho, sy = iy[y];
        for (int64_t xo = 0; xo < Wo; ++xo) {
          const int64_t sx = ix[xo];
          if (src_map) {
            const bool changed = src_map[(n * H + sy) * W + sx];
            m[(n * Ho + y) * Wo + xo] = changed;
            if (!changed) continue;
          }
          const float* s = xp + n * xs.n + sy * xs.h + sx * xs.w;
          float* d = op + n * os.n + y * os.h + xo * os.w;
          for (int64_t c = 0; c < C; ++c) d[c * os.c] = s[c * xs.c];
        }
      }
    });
  }
};

}  // namespace

std::unique_ptr<Step> upsample_step(int64_t in, int64_t out, std::vector<int64_t> iy, std::vector<int64_t> ix,
                                    int64_t H, int64_t W) {
  for (int64_t v : iy) TORCH_CHECK(v >= 0 && v < H, "FramePlan: upsample row index ", v, " outside 0..", H - 1);
  for (int64_t v : ix) TORCH_CHECK(v >= 0 && v < W, "FramePlan: upsample column index ", v, " outside 0..", W - 1);
  auto s = std::make_unique<UpsampleStep>();
  s->in = in;
  s->out = out;
  s->iy = std::move(iy);
  s->ix = std::move(ix);
  return s;
}

}  // namespace gs
