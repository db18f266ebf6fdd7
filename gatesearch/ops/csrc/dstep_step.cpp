// The D-STEP block and the plain dense conv as frame-plan steps: see dstep_step.h.

#include "dstep_step.h"

#include <limits>

namespace gs {
namespace {

constexpr int kSkip = 0, kReuse = 1, kCompute = 2;  // policies/dstep/nets.py: SKIP, REUSE, COMPUTE
constexpr double kSliceBelow = 0.8;                  // ops/channel_gather.py: SLICE_BELOW
constexpr int64_t kReorderPositions = 64;            // ops/channel_gather.py: REORDER_POSITIONS

// (1, c, h, w) zeros, channels_last (at::zeros drops a memory format given in its options).
at::Tensor zeros_cl(int64_t c, int64_t h, int64_t w) {
  return at::empty({1, c, h, w}, at::TensorOptions().dtype(at::kFloat), at::MemoryFormat::ChannelsLast).zero_();
}

// Whether output position (y, x) of a level lies on an active tile of its mask (Gq_h × Gq_w, row-major).
inline bool on_tile(const std::vector<uint8_t>& mask, int64_t q, int64_t Gqw, int64_t y, int64_t x) {
  return mask[(y / q) * Gqw + x / q] != 0;
}

// t <- 0 at every position off the active tiles (t: (1, C, H, W), any layout).
void zero_off_tiles(at::Tensor& t, const std::vector<uint8_t>& mask, int64_t q) {
  const int64_t C = t.size(1), H = t.size(2), W = t.size(3), Gqw = (W + q - 1) / q;
  const Strides s(t);
  float* p = t.data_ptr<float>();
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x)
      if (!on_tile(mask, q, Gqw, y, x))
        for (int64_t c = 0; c < C; ++c) p[y * s.h + x * s.w + c * s.c] = 0.f;
}

// (1, C, H, W) channels_last: bias on the active tiles, zero elsewhere.
at::Tensor bias_on_tiles(const at::Tensor& bias, const std::vector<uint8_t>& mask, int64_t q, int64_t H, int64_t W) {
  const int64_t C = bias.numel(), Gqw = (W + q - 1) / q;
  at::Tensor z = zeros_cl(C, H, W);
  float* p = z.data_ptr<float>();
  const at::Tensor b = bias.contiguous();
  const float* bp = b.data_ptr<float>();
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x)
      if (on_tile(mask, q, Gqw, y, x)) std::memcpy(p + (y * W + x) * C, bp, C * sizeof(float));
  return z;
}

at::Tensor index_tensor(const std::vector<int64_t>& v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

// xs = the block's online temporal shift of x (TSM): the first ``shift_fold`` channels from the previous frame.
at::Tensor DStepStep::shifted(const at::Tensor& x) {
  if (shift_fold <= 0) return x;
  const int64_t f = shift_fold;
  at::Tensor head = x.narrow(1, 0, f);
  at::Tensor xs = x.clone(at::MemoryFormat::ChannelsLast);
  if (shift_prev_.defined() && shift_prev_.sizes() == head.sizes())
    xs.narrow(1, 0, f).copy_(shift_prev_);
  else
    xs.narrow(1, 0, f).zero_();
  shift_prev_ = head.clone(at::MemoryFormat::ChannelsLast);
  return xs;
}

// conv(x) + bias for the out_idx output channels (undefined: all), reading the in_idx input channels (undefined:
// all; x holds exactly those), on the active tiles of ``mask``, exactly zero elsewhere: ops/channel_gather.py's
// tile_conv, step for step.
at::Tensor DStepStep::tile_conv(const at::Tensor& x, const DStepLevel& L, const std::vector<uint8_t>& mask,
                                const at::Tensor& out_idx, const at::Tensor& in_idx, double density) const {
  const int64_t co_all = L.weight.size(0), ci_all = L.weight.size(1);
  const int64_t co = out_idx.defined() ? out_idx.numel() : co_all;
  if (density == 0.0 || co == 0) return zeros_cl(co, L.Ho, L.Wo);
  const at::Tensor bias = out_idx.defined() ? L.bias.index_select(0, out_idx) : L.bias;
  if (x.size(1) == 0) return bias_on_tiles(bias, mask, L.tile, L.Ho, L.Wo);
  const std::vector<int64_t> stride{L.sh, L.sw}, padding{L.ph, L.pw}, dilation{L.dh, L.dw};
  if (!sparse_only && density >= L.crossover) {
    const Timer timer(&Profile::dense);
    const int64_t positions = L.Ho * L.Wo;
    const int64_t used = co * (in_idx.defined() ? in_idx.numel() : ci_all);
    const bool sliced = (out_idx.defined() || in_idx.defined()) && used < kSliceBelow * co_all * ci_all &&
                        used * (positions + kReorderPositions) < co_all * ci_all * positions;
    at::Tensor out;
    if (sliced) {
      at::Tensor w = out_idx.defined() ? L.weight.index_select(0, out_idx) : L.weight;
      if (in_idx.defined()) w = w.index_select(1, in_idx);
      out = at::conv2d(x, w, bias, stride, padding, dilation);
    } else {
      at::Tensor input = x;
      if (in_idx.defined()) {  // the used input channels among zeros
        input = at::zeros({x.size(0), ci_all, x.size(2), x.size(3)}, x.options());
        input.index_copy_(1, in_idx, x);
      }
      out = at::conv2d(input, L.weight, L.bias, stride, padding, dilation);
      if (out_idx.defined()) out = out.index_select(1, out_idx);
    }
    if (density < 1.0) zero_off_tiles(out, mask, L.tile);
    return out;
  }
  at::Tensor z = bias_on_tiles(bias, mask, L.tile, L.Ho, L.Wo);
  at::Tensor wpack = L.gemm;  // (T, Ci, Co)
  if (in_idx.defined()) wpack = wpack.index_select(1, in_idx);
  wpack = wpack.reshape({-1, co_all});
  if (out_idx.defined()) wpack = wpack.index_select(1, out_idx);
  wpack = wpack.reshape({1, -1, co}).contiguous();
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const Geometry g = Geometry::parse({L.weight.size(2), L.weight.size(3), L.sh, L.sw, L.ph, L.pw, L.dh, L.dw, 1,
                                      L.tile, L.Ho, L.Wo});
  std::vector<Block> blocks;
  int64_t M = 0;
  for (int64_t by = 0; by < g.Bh; ++by)
    for (int64_t bx = 0; bx < g.Bw; ++bx)
      if (mask[by * g.Bw + bx]) {
        blocks.push_back(g.block(0, by, bx, M));
        M += blocks.back().area();
      }
  if (M > 0) gather_gemm_scatter(z, xc, nullptr, nullptr, wpack, at::Tensor(), blocks, g, M);
  return z;
}

void DStepStep::run(std::vector<Slot>& slots, bool reference) {
  const Slot& sx = slots[in];
  const at::Tensor x = sx.t;
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  if (reference) {  // a clip's first frame: nothing to reuse, g_{t-1} = 0, the shift takes zeros
    kept_.clear();
    g_prev_ = at::Tensor();
    shift_prev_ = at::Tensor();
  }
  const at::Tensor xs = shifted(x);
  const DStepLevel& L0 = levels[0];
  const int64_t C = L0.weight.size(0), G = Gh * Gw, depth = levels.size();
  const int64_t hidden = fc1_w.size(0);

  // -- the policies (D-STEP Section 3.1, rounding / argmax at inference) -------------------------------------
  std::vector<uint8_t> S(N * G);
  std::vector<int> choice(N * C);
  at::Tensor g = at::empty({N, Cin}, at::kFloat);
  {
    const Timer timer(&Profile::gate);
    std::vector<float> sums(N * G * Cin, 0.f);  // (N, G, Cin) tile sums of xs
    const Strides s(xs);
    const float* xp = xs.data_ptr<float>();
    const int64_t hp = std::min(H, Gh * in_tile), wp = std::min(W, Gw * in_tile);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t y = 0; y < hp; ++y)
        for (int64_t xx = 0; xx < wp; ++xx) {
          float* d = sums.data() + (n * G + (y / in_tile) * Gw + xx / in_tile) * Cin;
          const float* src = xp + n * s.n + y * s.h + xx * s.w;
          for (int64_t c = 0; c < Cin; ++c) d[c] += src[c * s.c];
        }
    const float* sw = spatial.data_ptr<float>();  // (9, Cin)
    std::vector<float> taps(9 * G), mean(Cin);
    float* gp = g.data_ptr<float>();
    const float inv_hw = 1.0f / static_cast<float>(H * W);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t t = 0; t < G; ++t) {
        const float* sm = sums.data() + (n * G + t) * Cin;
        for (int64_t c = 0; c < Cin; ++c) mean[c] = sm[c] / in_area[t];
        for (int k = 0; k < 9; ++k) taps[k * G + t] = dot(sw + k * Cin, mean.data(), Cin);
      }
      for (int64_t ty = 0; ty < Gh; ++ty)
        for (int64_t tx = 0; tx < Gw; ++tx) {
          float v = 0.f;
          for (int k = 0; k < 9; ++k) {  // 3×3 cross-correlation on the tile grid, zero padding 1
            const int64_t yy = ty + k / 3 - 1, xx = tx + k % 3 - 1;
            if (yy >= 0 && yy < Gh && xx >= 0 && xx < Gw) v += taps[k * G + yy * Gw + xx];
          }
          S[n * G + ty * Gw + tx] = (v + spatial_bias) > 0.f;
        }
      for (int64_t c = 0; c < Cin; ++c) {  // g_t: GAP of S ⊙ x_t
        float a = 0.f;
        for (int64_t t = 0; t < G; ++t)
          if (S[n * G + t]) a += sums[(n * G + t) * Cin + c];
        gp[n * Cin + c] = a * inv_hw;
      }
    }
    const bool have_prev = g_prev_.defined() && g_prev_.sizes() == g.sizes();
    const float* w1 = fc1_w.data_ptr<float>();  // (hidden, 2 Cin)
    const float* b1 = fc1_b.data_ptr<float>();
    const float* w2 = fc2_w.data_ptr<float>();  // (3 C, hidden)
    const float* b2 = fc2_b.data_ptr<float>();
    std::vector<float> h(hidden), logits(3 * C);
    for (int64_t n = 0; n < N; ++n) {
      const float* gn = gp + n * Cin;
      const float* pn = have_prev ? g_prev_.data_ptr<float>() + n * Cin : nullptr;
      for (int64_t j = 0; j < hidden; ++j) {
        float v = b1[j] + dot(w1 + j * 2 * Cin, gn, Cin);
        if (pn) v += dot(w1 + j * 2 * Cin + Cin, pn, Cin);
        h[j] = v > 0.f ? v : 0.f;
      }
      for (int64_t c = 0; c < C; ++c) {
        int best = 0;
        float top = -std::numeric_limits<float>::infinity();
        for (int k = 0; k < 3; ++k) {
          const float v = b2[c * 3 + k] + dot(w2 + (c * 3 + k) * hidden, h.data(), hidden);
          if (v > top) top = v, best = k;  // the first of equal maxima, as argmax
        }
        choice[n * C + c] = best;
      }
    }
    g_prev_ = g;
  }

  // -- Eq. 1 on the active tiles, per stream -------------------------------------------------------------------
  if (static_cast<int64_t>(kept_.size()) != N) kept_.assign(N, Kept());
  stats.assign(N, std::vector<double>(depth + 3, 0.0));
  std::vector<at::Tensor> branches;
  branches.reserve(N);
  std::vector<std::vector<uint8_t>> masks(depth);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double>& st = stats[n];
    for (int64_t i = 0; i < depth; ++i) {
      const DStepLevel& L = levels[i];
      std::vector<uint8_t>& m = masks[i];
      m.assign(L.rows.size() * L.cols.size(), 0);
      float area = 0.f;
      for (size_t r = 0; r < L.rows.size(); ++r)
        for (size_t c = 0; c < L.cols.size(); ++c) {
          const uint8_t on = S[n * G + L.rows[r] * Gw + L.cols[c]];
          m[r * L.cols.size() + c] = on;
          if (on) area += L.area[r * L.cols.size() + c];
        }
      st[i] = (i > 0 && L.same_grid) ? st[0] : area;
    }
    std::vector<int64_t> computed, reused;
    int64_t skipped = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int k = choice[n * C + c];
      if (k == kCompute) computed.push_back(c);
      else if (k == kReuse) reused.push_back(c);
      else ++skipped;
    }
    st[depth] = skipped, st[depth + 1] = reused.size(), st[depth + 2] = computed.size();
    const int64_t compute = computed.size();
    const at::Tensor xn = xs.narrow(0, n, 1);

    at::Tensor a;  // relu(conv1) of the compute channels on the active tiles
    if (compute) {
      a = tile_conv(xn, L0, masks[0], compute == C ? at::Tensor() : index_tensor(computed), at::Tensor(), st[0]);
      a.relu_();
    }
    std::vector<int64_t> live, pos;  // reused channels that held values at t-1, and where they are kept
    const Kept& prev = kept_[n];
    if (!reused.empty() && prev.features.defined()) {
      std::vector<int64_t> where(C, -1);
      for (size_t j = 0; j < prev.channels.size(); ++j) where[prev.channels[j]] = j;
      for (int64_t c : reused)
        if (where[c] >= 0) live.push_back(c), pos.push_back(where[c]);
    }
    const int64_t K = compute + live.size();
    at::Tensor y;
    {
      const Timer timer(&Profile::pointwise);
      if (live.empty() && compute) {
        y = a;
      } else {
        y = zeros_cl(K, L0.Ho, L0.Wo);
        float* yp = y.data_ptr<float>();
        const int64_t Gqw = (L0.Wo + L0.tile - 1) / L0.tile;
        const Strides as = compute ? Strides(a) : Strides(y);
        const float* ap = compute ? a.data_ptr<float>() : nullptr;
        const Strides ps = live.empty() ? Strides(y) : Strides(prev.features);
        const float* pp = live.empty() ? nullptr : prev.features.data_ptr<float>();
        for (int64_t yy = 0; yy < L0.Ho; ++yy)
          for (int64_t xx = 0; xx < L0.Wo; ++xx) {
            float* d = yp + (yy * L0.Wo + xx) * K;
            for (int64_t c = 0; c < compute; ++c) d[c] = ap[yy * as.h + xx * as.w + c * as.c];
            if (pp && on_tile(masks[0], L0.tile, Gqw, yy, xx))
              for (size_t j = 0; j < live.size(); ++j) d[compute + j] = pp[yy * ps.h + xx * ps.w + pos[j] * ps.c];
          }
      }
    }
    std::vector<int64_t> used = computed;
    used.insert(used.end(), live.begin(), live.end());
    Kept next;
    if (!used.empty()) next.features = y, next.channels = used;
    const bool full = static_cast<int64_t>(used.size()) == C && compute == C;
    const at::Tensor used_idx = full ? at::Tensor() : index_tensor(used);
    for (int64_t i = 1; i < depth; ++i) {
      y = tile_conv(y, levels[i], masks[i], at::Tensor(), i > 1 || full ? at::Tensor() : used_idx, st[i]);
      if (i < depth - 1) y.relu_();
    }
    kept_[n] = std::move(next);
    branches.push_back(y);
  }

  // -- the block output: relu(identity + S ⊙ branch) --------------------------------------------------------
  at::Tensor identity = x;
  if (ds_weight.defined()) {
    const Timer timer(&Profile::dense);
    const auto& d = ds_geometry;
    identity = at::conv2d(x, ds_weight, ds_bias, {d[0], d[1]}, {d[2], d[3]}, {d[4], d[5]});
  }
  const Timer timer(&Profile::pointwise);
  const struct { int64_t H, W; } last{levels.back().Ho, levels.back().Wo};
  const int64_t Co = identity.size(1);
  Slot& so = slots[out];
  if (!so.t.defined() || so.t.size(0) != N || so.t.size(1) != Co || so.t.size(2) != last.H || so.t.size(3) != last.W)
    so.t = at::empty({N, Co, last.H, last.W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  so.mark_all();
  const Strides is(identity), os(so.t);
  const float* ip = identity.data_ptr<float>();
  float* op = so.t.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const at::Tensor& b = branches[n];
    TORCH_CHECK(b.size(1) == Co && b.size(2) == last.H && b.size(3) == last.W,
                "FramePlan: a D-STEP branch does not match its shortcut");
    const Strides bs(b);
    const float* bp = b.data_ptr<float>();
    for (int64_t yy = 0; yy < last.H; ++yy)
      for (int64_t xx = 0; xx < last.W; ++xx) {
        const float* iv = ip + n * is.n + yy * is.h + xx * is.w;
        const float* bv = bp + yy * bs.h + xx * bs.w;
        float* ov = op + n * os.n + yy * os.h + xx * os.w;
        for (int64_t c = 0; c < Co; ++c) {
          const float v = iv[c * is.c] + bv[c * bs.c];
          ov[c * os.c] = v > 0.f ? v : 0.f;
        }
      }
  }
}

namespace {

struct DenseConvStep : Step {
  int64_t in = 0, out = 0;
  at::Tensor weight, bias;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;

  void run(std::vector<Slot>& slots, bool) override {
    const Timer timer(&Profile::dense);
    Slot& o = slots[out];
    o.t = channels_last(at::conv2d(slots[in].t, weight, bias, stride, padding, dilation, groups));
    o.mark_all();
  }
};

}  // namespace

std::unique_ptr<Step> dense_conv_step(int64_t in, int64_t out, at::Tensor weight, c10::optional<at::Tensor> bias,
                                      std::vector<int64_t> geometry) {
  TORCH_CHECK(geometry.size() == 7, "FramePlan: a dense conv takes stride, padding, dilation and groups (7 ints)");
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kFloat, "FramePlan: a conv weight must be 4-D fp32");
  auto s = std::make_unique<DenseConvStep>();
  s->in = in;
  s->out = out;
  s->weight = weight.contiguous();
  s->bias = bias.has_value() ? bias->contiguous() : at::Tensor();
  s->stride = {geometry[0], geometry[1]};
  s->padding = {geometry[2], geometry[3]};
  s->dilation = {geometry[4], geometry[5]};
  s->groups = geometry[6];
  return s;
}

}  // namespace gs
