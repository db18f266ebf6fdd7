// The Gumbel gate inside a native frame plan's skip-conv step (conv_step.cpp).
//
// Skip-Convolutions Eq. 8 at inference keeps a position where round(σ(f)) = 1,
// i.e. f > 0, with f the layer-shaped one-channel conv of the gate on |r_t|
// (policies/gumbel.py says why the magnitude); a b x b block is recomputed when
// any of its outputs is. This is gate_block_linear's test (gate.cpp) on one
// block's residual halo, which the conv step has already formed: the same
// |x - x_prev| values and the same dot products in the same order, so the same
// decisions as the per-layer path.

#include "frame.h"

namespace gs {

bool LinearGate::fires(const float* x, const float* old, const Halo& h, int64_t C, const Block& bl, const Geometry& g,
                       float* scratch) const {
  float* r = scratch;  // |x - old| over the halo, (ph, pw, C)
  abs_diff(x, old, h.ph * h.pw * C, r);
  const float* wp = weight.data_ptr<float>();
  for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
    for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) {
      float f = bias;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const float* row = r + (((oy - bl.oy0) * g.sh + ky * g.dh) * h.pw + (ox - bl.ox0) * g.sw) * C;
        const float* w = wp + ky * g.kw * C;
        if (g.dw == 1) {
          f += dot(row, w, g.kw * C);
        } else {
          for (int64_t kx = 0; kx < g.kw; ++kx) f += dot(row + kx * g.dw * C, w + kx * C, C);
        }
      }
      if (f > 0.f) return true;
    }
  return false;
}

}  // namespace gs
