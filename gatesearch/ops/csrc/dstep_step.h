// A D-STEP residual block (D-STEP, Eq. 1) and a plain dense conv as steps of a native frame plan (frame.cpp).
//
// The block step is policies/dstep/block.py's ``DStepBlock._infer`` without
// Python between its ~60 small operations: the spatial policy (tile sums, a
// 3×3 conv on the tile grid, rounding) decides S_t, the channel policy (GAP of
// S ⊙ x_t, a two-layer MLP on [g_t, g_{t-1}], argmax) decides T_t, then Eq. 1
// runs on the active tiles only — conv1 for the compute channels, the kept
// h_{t-1} for the reused ones, the later convs reading the non-skipped
// channels, all through the Skip-Conv gather (gather_gemm.cpp) or, above the
// layer's calibrated crossover, the dense conv then masked — and the block's
// output is relu(identity + S ⊙ branch). The dense conv step runs the
// backbone's plain convs (eval BN folded in) between the blocks.

#pragma once

#include "frame.h"

namespace gs {

// One conv of a block's branch, eval BN folded in, on the tile grid of S.
struct DStepLevel {
  at::Tensor weight, bias;  // (Co, Ci, kh, kw), (Co,)
  at::Tensor gemm;          // (kh*kw, Ci, Co): the gather's (tap, channel) row order
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t tile = 1, Ho = 0, Wo = 0;          // q: output tile side here; output size
  std::vector<int64_t> rows, cols;           // row / column of S each of this conv's tiles takes
  std::vector<float> area;                   // (Gq_h * Gq_w): the fraction of the output each tile covers
  bool same_grid = false;                    // tiles and output as conv1's: conv1's area is this conv's
  double crossover = 0.5;                    // active fraction from which the dense conv (then masked) is faster
};

struct DStepStep : Step {
  int64_t in = 0, out = 0;
  // spatial policy: 3×3 conv (9, Cin) to one map on the tile grid, plus its bias (spatial_bias·gain + offset)
  at::Tensor spatial;  // (9, Cin)
  float spatial_bias = 0;
  // channel policy: fc1 (hidden, 2 Cin) + bias, fc2 (3 C, hidden) + bias (compute logits shifted by the offset)
  at::Tensor fc1_w, fc1_b, fc2_w, fc2_b;
  int64_t tile = 1, in_tile = 1, Gh = 1, Gw = 1;
  std::vector<float> in_area;  // (Gh * Gw) input pixels per tile
  int64_t shift_fold = 0;      // > 0: the block's online temporal shift takes this many channels from t-1
  at::Tensor ds_weight, ds_bias;  // folded downsample conv (undefined: identity shortcut)
  std::vector<int64_t> ds_geometry;  // stride, padding, dilation (6 ints)
  bool sparse_only = false;  // path "sparse": always gather tiles
  std::vector<DStepLevel> levels;

  // The last frame's per-stream statistics: each conv's active area, then the skip / reuse / compute counts.
  std::vector<std::vector<double>> stats;

  void run(std::vector<Slot>& slots, bool reference) override;

 private:
  struct Kept {  // h_t of one stream: only the channels that hold values (compute, then reused ones)
    at::Tensor features;  // (1, K, Hh, Wh) channels_last
    std::vector<int64_t> channels;
  };
  std::vector<Kept> kept_;
  at::Tensor g_prev_;      // (N, Cin): the pooled masked input of the previous frame (undefined: zeros)
  at::Tensor shift_prev_;  // (N, fold, H, W) the shifted channels of the previous frame (undefined: zeros)

  at::Tensor shifted(const at::Tensor& x);
  at::Tensor tile_conv(const at::Tensor& x, const DStepLevel& L, const std::vector<uint8_t>& mask,
                       const at::Tensor& out_idx, const at::Tensor& in_idx, double density) const;
};

// A plain conv (its eval BN folded in by the planner), dense on every frame: the layers between D-STEP blocks.
std::unique_ptr<Step> dense_conv_step(int64_t in, int64_t out, at::Tensor weight, c10::optional<at::Tensor> bias,
                                      std::vector<int64_t> geometry);

}  // namespace gs
