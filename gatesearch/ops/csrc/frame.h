// What the steps of a native frame plan share (frame.cpp: the plan and its
// pointwise steps; conv_step.cpp: the skip-conv step).
//
// Slots are the frame's tensors (channels_last fp32): slot 0 is the input
// frame, every step writes one slot. A slot carries the map (N, H, W) of the
// positions this frame changed (none kept: all of them), and, when a
// frame-reference conv reads it, its previous frame's values.

#pragma once

#include <torch/extension.h>

#include <memory>
#include <vector>

#include "kernels.h"

namespace gs {

enum Kind : int64_t { kGemm = 0, kDepthwise = 1 };  // ops/packing.py: Kind
enum Reference : int64_t { kFrame = 0, kBlock = 1 };  // residual against the previous frame (Eq. 3) / block refs

struct Slot {
  at::Tensor t;        // (N, C, H, W) channels_last
  at::Tensor changed;  // bool (N, H, W): positions this frame changed (valid when !all)
  bool all = true;
  bool keep_prev = false;  // a frame-reference conv reads it: keep last frame's values
  at::Tensor prev;
  const bool* map() const { return all ? nullptr : changed.data_ptr<bool>(); }
  int64_t positions() const { return t.size(0) * t.size(2) * t.size(3); }
  void mark_all() { all = true; }
  bool* fresh_map() {  // the map of positions this step is about to change
    const std::vector<int64_t> shape{t.size(0), t.size(2), t.size(3)};
    if (!changed.defined() || changed.sizes() != c10::IntArrayRef(shape)) changed = at::empty(shape, at::kBool);
    all = false;
    return changed.data_ptr<bool>();
  }
};

struct Step {
  virtual ~Step() = default;
  virtual void run(std::vector<Slot>& slots, bool reference) = 0;
};

inline at::Tensor channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// The Gumbel gate at inference (Eq. 8: f > 0 on |r_t|), in place of the norm gate: see gumbel_gate.cpp.
struct LinearGate {
  at::Tensor weight;  // packed (kh, kw, Ci), fp32; undefined: the layer has a norm gate
  float bias = 0;
  bool on() const { return weight.defined(); }
  // Whether one block fires on the halo x (minus old, when given), channel-minor (ph, pw, C); scratch: ph*pw*C.
  bool fires(const float* x, const float* old, const Halo& h, int64_t C, const Block& bl, const Geometry& g,
             float* scratch) const;
};

// Nearest upsampling by index tables (upsample_step.cpp).
std::unique_ptr<Step> upsample_step(int64_t in, int64_t out, std::vector<int64_t> iy, std::vector<int64_t> ix,
                                    int64_t H, int64_t W);

// The clip head's per-frame pooling, (N, C, H, W) -> (N, C * grid^2 + C) (head_pool_step.cpp).
std::unique_ptr<Step> head_pool_step(int64_t in, int64_t out, int64_t grid);

// A skip-conv (its eval BN folded in): see conv_step.cpp.
struct ConvStep : Step {
  int64_t in = 0, out = 0;
  Geometry g{};
  Kind kind = kGemm;
  Reference reference = kBlock;
  at::Tensor wpack, onednn, weight, bias;  // packed for the sparse step; the (folded) conv weight and bias
  PanelWeight panels;  // the GEMM weight in panels of output channels (layers that take the per-block kernel)
  bool per_block = false;
  float threshold = 0, scale = 1;
  LinearGate linear;  // set: the Gumbel gate decides instead of the norm gate (threshold, scale unused)
  int64_t max_rows = 0;  // above: the dense conv is faster (ops.sparse_rows_limit)
  at::Tensor ref;        // block references (reference kBlock)
  at::Tensor mask_t;     // bool (N, Bh, Bw): the blocks this frame recomputes
  at::Tensor residuals;  // per block, this frame's residual halo (the per-block path's gate -> compute hand-off)
  int64_t rows = -1;     // output positions the last frame recomputed (-1: a dense reference frame)
  double macs_per_row = 0;

  void setup();
  void run(std::vector<Slot>& slots, bool reference_frame) override;

 private:
  void reference_step(const Slot& x, Slot& z);
  void per_block_step(const Slot& x, Slot& z, bool* mask);
  void gemm_step(const Slot& x, Slot& z, bool* mask);
  bool gate_block(const Slot& x, const Block& bl, Scratch& s, float* r) const;
  void compute_block(const float* r, const Block& bl, int64_t group, Scratch& s, float* zp, const Strides& zs) const;
  int64_t finish(Slot& z, const bool* mask, int64_t N, std::vector<Block>* blocks) const;
  void dense_step(const Slot& x, Slot& z, const std::vector<Block>& blocks, bool refs_fresh);
  void gate(const Slot& x, bool* mask) const;
};

}  // namespace gs
