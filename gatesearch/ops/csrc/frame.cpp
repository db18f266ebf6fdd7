// A gated network's frame step run natively from a layer plan.
//
// Skip-Convolutions' per-frame work (Eq. 3: gate, then conv on the active
// blocks) is small at low density, so on small layers the cost of getting
// there from Python — a module call, a gate call, a step call, a change map
// and a stream-layer update per layer — is larger than the work itself, and
// a gated frame of a tiny net ran slower than its dense twin. A FramePlan
// holds every layer of a frame in order (skip-convs with their gates, ReLU /
// ReLU6 / residual adds, max-pools) with their weights, states, block
// references and change maps, and runs a whole frame in one call: no Python
// between layers, and each layer touches only what changed (the same kernels
// and the same arithmetic as the per-layer path, so the outputs match it).
//
// Slots are the frame's tensors (channels_last fp32): slot 0 is the input
// frame, every step writes one slot. A slot carries the map (N, H, W) of the
// positions this frame changed (none kept: all of them), and, when a
// frame-reference conv reads it, its previous frame's values.

#include <torch/extension.h>

#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "kernels.h"

namespace gs {
namespace {

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

at::Tensor channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// The dense conv of x (bias undefined: none), as F.conv2d runs it.
at::Tensor conv_dense(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const Geometry& g) {
  const c10::optional<at::Tensor> b = bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  return at::conv2d(x, weight, b, {g.sh, g.sw}, {g.ph, g.pw}, {g.dh, g.dw}, g.groups);
}

// fn(i, scratch) for i in [0, n), threads taking items as they free up (active blocks cluster where the
// motion is, so equal shares of the grid would leave one thread idle); serial when ``parallel`` is false.
template <typename F>
void for_each_dynamic(int64_t n, bool parallel, F&& fn) {
  const int threads = at::get_num_threads();
  if (!parallel || threads < 2 || n < 2 || at::in_parallel_region()) {
    Scratch s;
    for (int64_t i = 0; i < n; ++i) fn(i, s);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    Scratch s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) fn(i, s);
  }
}

// Weights up to this size run the per-block kernel (block_conv.cpp: the weight is re-read for every block, so
// it has to stay in the core's cache); larger ones the gather -> one GEMM -> scatter path.
constexpr int64_t kBlockKernelBytes = 1 << 20;
// Below this many multiply-adds a layer's step runs on one thread: waking the other costs more.
constexpr double kParallelMacs = 2e5;

// A skip-conv (its eval BN folded in): dense on a reference frame, else the gate then the conv step on the
// active blocks (the dense conv masked to them above the crossover, as ops.block_sparse does).
//
// Layers whose weight stays in cache (and depthwise ones) gate and compute each block in one pass: a block
// whose input halo changed is read once, its residual tested (Eq. 5 / 7) and, when it fires, multiplied into z
// right away (block_conv / depthwise_block). Whether the frame will be sparse enough for that is predicted from
// the last frame; when it was not, the gate runs first and the dense conv takes over above the crossover (the
// result is the same either way, only the cost differs).
struct ConvStep : Step {
  int64_t in, out;
  Geometry g;
  Kind kind;
  Reference reference;
  at::Tensor wpack, onednn, weight, bias;  // packed for the sparse step; the (folded) conv weight and bias
  PanelWeight panels;  // the GEMM weight for block_conv (layers that take the per-block kernel)
  bool per_block = false;
  float threshold, scale;
  int64_t max_rows;  // above: the dense conv is faster (ops.sparse_rows_limit)
  at::Tensor ref;    // block references (reference kBlock)
  at::Tensor mask_t;  // bool (N, Bh, Bw): the blocks this frame recomputes
  int64_t rows = -1;  // output positions the last frame recomputed (-1: a dense reference frame)
  double macs_per_row = 0;

  void setup() {
    const int64_t Ci = weight.size(1) * g.groups, Co = weight.size(0);
    macs_per_row = static_cast<double>(g.taps()) * (Ci / g.groups) * Co;
    if (kind == kDepthwise) {
      per_block = true;
    } else if (g.groups == 1 && wpack.numel() * 4 <= kBlockKernelBytes) {
      panels = pack_panels(wpack);
      per_block = true;
    }
  }

  void run(std::vector<Slot>& slots, bool reference_frame) override {
    const Slot& x = slots[in];
    Slot& z = slots[out];
    if (reference_frame) {
      const Timer timer(&Profile::dense);
      z.t = channels_last(conv_dense(x.t, weight, bias, g));
      z.mark_all();
      if (reference == kBlock) {
        const int64_t size = x.t.size(0) * g.Bh * g.Bw * g.slot(x.t.size(1));
        if (!ref.defined() || ref.numel() != size) ref = at::empty({size}, x.t.options());
        const BlockRef br = block_ref(ref, g, x.t);
        const Input in_x(x.t);
        for_blocks(g, in_x.N, nullptr, br.slot, [&](const Block& bl, std::vector<float>&) {
          read_halo(in_x, bl, g, br.at(bl));
        });
      }
      rows = -1;
      return;
    }
    const int64_t N = x.t.size(0);
    if (!mask_t.defined() || mask_t.size(0) != N) mask_t = at::empty({N, g.Bh, g.Bw}, at::kBool);
    bool* mask = mask_t.data_ptr<bool>();
    const bool parallel = (rows < 0 ? N * g.Ho * g.Wo : rows) * macs_per_row >= kParallelMacs;
    if (per_block && rows <= max_rows) {  // the last frame was sparse: gate and compute in one pass
      const Timer timer(&Profile::fused);
      for_each_dynamic(N * g.Bh * g.Bw, parallel, [&](int64_t i, Scratch& s) {
        mask[i] = step_block(x, z, g.block(i / (g.Bh * g.Bw), (i / g.Bw) % g.Bh, i % g.Bw), s, true);
      });
      rows = finish(z, mask, N, nullptr);
      return;
    }
    {
      const Timer timer(&Profile::gate);
      gate(x, mask);
    }
    std::vector<Block> blocks;
    rows = finish(z, mask, N, &blocks);
    if (rows == 0) return;
    if (rows > max_rows) {
      dense_step(x, z, blocks);
    } else if (per_block) {
      const Timer timer(&Profile::fused);
      for_each_dynamic(blocks.size(), parallel, [&](int64_t i, Scratch& s) { step_block(x, z, blocks[i], s, false); });
    } else {
      const float* prev = reference == kFrame ? x.prev.data_ptr<float>() : nullptr;
      BlockRef br;
      if (reference == kBlock) br = block_ref(ref, g, x.t);
      gather_gemm_scatter(z.t, x.t, prev, reference == kBlock ? &br : nullptr, wpack, onednn, blocks, g, rows);
    }
  }

  // One block: its residual halo (against the previous frame or its reference); with ``gating``, the gate
  // decides whether it fires (unread when its halo holds no changed input); when it fires, the block's outputs
  // are added to z and its reference refreshed. Returns whether it fired.
  bool step_block(const Slot& x, Slot& z, const Block& bl, Scratch& s, bool gating) const {
    const bool* changed = x.map();
    const Input in_x(x.t);
    const int64_t C = in_x.C;
    if (gating && changed && !halo_changed(changed, in_x.H, in_x.W, bl, g)) return false;
    const Halo h = g.halo(bl);
    const int64_t n = h.ph * h.pw * C;
    float* ref_slot = nullptr;
    if (reference == kBlock) {  // r = x - ref
      ref_slot = ref.data_ptr<float>() + g.cell(bl) * g.slot(C);
      s.x.resize(n);
      s.r.resize(n);
      read_halo(in_x, bl, g, s.x.data());
      const float* xv = s.x.data();
      float* rv = s.r.data();
      for (int64_t i = 0; i < n; ++i) rv[i] = xv[i] - ref_slot[i];
    } else {  // r = x - x_prev
      load_patch(Input(x.t, x.prev.data_ptr<float>()), bl.n, h, s.r);
    }
    if (gating) {
      s.work.resize(n + 2 * h.ph * h.pw);
      if (!block_fires(s.r.data(), nullptr, h, C, bl, g, threshold, scale, s.work.data(), reference == kBlock))
        return false;
    }
    if (ref_slot) std::memcpy(ref_slot, s.x.data(), n * sizeof(float));
    const Strides zs(z.t);
    float* zp = z.t.data_ptr<float>();
    if (kind == kDepthwise) {
      s.acc.resize(z.t.size(1));
      depthwise_block(s.r.data(), h, C, bl, g, wpack.data_ptr<float>(), z.t.size(1), zp, zs, s.acc.data());
    } else {
      block_conv(s.r.data(), h, C, bl, g, panels, zp, zs);
    }
    return true;
  }

  // The map of z's changed positions from the mask; returns the recomputed positions (and lists the blocks).
  int64_t finish(Slot& z, const bool* mask, int64_t N, std::vector<Block>* blocks) const {
    const Timer timer(&Profile::map);
    block_positions_into(z.fresh_map(), mask, g, N);
    int64_t M = 0;
    for (int64_t n = 0, i = 0; n < N; ++n)
      for (int64_t by = 0; by < g.Bh; ++by)
        for (int64_t bx = 0; bx < g.Bw; ++bx, ++i) {
          if (!mask[i]) continue;
          const Block bl = g.block(n, by, bx, M);
          if (blocks) blocks->push_back(bl);
          M += bl.area();
        }
    return M;
  }

  // Denser than the crossover: the dense conv, masked to the active blocks.
  void dense_step(const Slot& x, Slot& z, const std::vector<Block>& blocks) {
    const Timer timer(&Profile::dense);
    const int64_t N = x.t.size(0);
    if (reference == kBlock) {  // z[active] = conv(x)[active]; references of the active blocks <- x
      const at::Tensor full = conv_dense(x.t, weight, bias, g);
      copy_blocks(z.t, full, blocks);
      const BlockRef br = block_ref(ref, g, x.t);
      const Input in_x(x.t);
      for (const Block& bl : blocks) read_halo(in_x, bl, g, br.at(bl));
    } else {  // z[active] += conv(x - x_prev)[active]
      const at::Tensor r = channels_last(x.t - x.prev);
      const at::Tensor full = conv_dense(r, weight, at::Tensor(), g);
      if (rows == N * g.Ho * g.Wo)
        z.t.add_(full);
      else
        add_blocks(z.t, full, blocks);
    }
  }

  // mask[block] <- the norm gate (Eq. 5 / 7) against the previous frame or the block's reference; blocks
  // whose input halo holds no changed position are not read (their residual cannot have grown).
  void gate(const Slot& x, bool* mask) const {
    const Input in_x(x.t);
    const int64_t C = in_x.C, H = in_x.H, W = in_x.W, slot = g.slot(C), P = slot / C;
    const bool* changed = x.map();
    BlockRef br;
    if (reference == kBlock) br = block_ref(ref, g, x.t);
    const Input in_prev = reference == kFrame ? Input(x.prev) : in_x;
    for_blocks(g, in_x.N, nullptr, slot, [&](const Block& bl, std::vector<float>& buf) {
      bool fires = false;
      if (!changed || halo_changed(changed, H, W, bl, g)) {
        buf.resize(3 * slot + 2 * P);  // halo, the previous frame's halo, scratch
        float* halo = buf.data();
        float* old = halo + slot;
        float* scratch = halo + 2 * slot;
        const Halo h = read_halo(in_x, bl, g, halo);
        if (reference == kBlock) {
          fires = block_fires(halo, br.at(bl), h, C, bl, g, threshold, scale, scratch, true);
        } else {  // the same sums as gate_block_mask, so the same decisions as the per-layer path
          read_halo(in_prev, bl, g, old);
          fires = block_fires(halo, old, h, C, bl, g, threshold, scale, scratch, false);
        }
      }
      mask[g.cell(bl)] = fires;
    });
  }

  static void for_positions(const at::Tensor& z, const at::Tensor& src, const std::vector<Block>& blocks,
                            bool copy) {
    const int64_t C = z.size(1);
    const Strides zs(z), ss(src);
    float* zp = z.data_ptr<float>();
    const float* sp = src.data_ptr<float>();
    at::parallel_for(0, blocks.size(), grain(blocks.empty() ? 1 : blocks[0].area() * C), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const Block& bl = blocks[i];
        for (int64_t oy = bl.oy0; oy < bl.oy1; ++oy)
          for (int64_t ox = bl.ox0; ox < bl.ox1; ++ox) {
            float* d = zp + bl.n * zs.n + oy * zs.h + ox * zs.w;
            const float* s = sp + bl.n * ss.n + oy * ss.h + ox * ss.w;
            if (copy)
              for (int64_t c = 0; c < C; ++c) d[c * zs.c] = s[c * ss.c];
            else
              for (int64_t c = 0; c < C; ++c) d[c * zs.c] += s[c * ss.c];
          }
      }
    });
  }
  static void copy_blocks(const at::Tensor& z, const at::Tensor& src, const std::vector<Block>& b) {
    for_positions(z, src, b, true);
  }
  static void add_blocks(const at::Tensor& z, const at::Tensor& src, const std::vector<Block>& b) {
    for_positions(z, src, b, false);
  }
};

// out <- clamp(a (+ b), lo, hi) where an input changed: ReLU, ReLU6, a residual add (with its ReLU).
struct ClampStep : Step {
  int64_t a, b, out;  // b < 0: no second operand
  float lo, hi;

  void run(std::vector<Slot>& slots, bool reference) override {
    const Timer timer(&Profile::pointwise);
    const Slot& sa = slots[a];
    const Slot* sb = b >= 0 ? &slots[b] : nullptr;
    Slot& so = slots[out];
    if (!so.t.defined() || so.t.sizes() != sa.t.sizes())
      so.t = at::empty(sa.t.sizes(), sa.t.options().memory_format(at::MemoryFormat::ChannelsLast));
    const int64_t P = sa.positions(), C = sa.t.size(1);
    const bool* changed = nullptr;
    if (reference || sa.all || (sb && sb->all)) {
      so.mark_all();
    } else {
      bool* m = so.fresh_map();
      const bool* ma = sa.map();
      const bool* mb = sb ? sb->map() : nullptr;
      for (int64_t p = 0; p < P; ++p) m[p] = ma[p] || (mb && mb[p]);
      changed = m;
    }
    clamp_positions(so.t.data_ptr<float>(), sa.t.data_ptr<float>(), sb ? sb->t.data_ptr<float>() : nullptr, changed,
                    P, C, lo, hi);
  }
};

struct MaxPoolStep : Step {
  int64_t in, out, kh, kw, sh, sw, ph, pw;

  void run(std::vector<Slot>& slots, bool reference) override {
    const Timer timer(&Profile::pool);
    const Slot& x = slots[in];
    Slot& o = slots[out];
    const int64_t N = x.t.size(0), C = x.t.size(1), H = x.t.size(2), W = x.t.size(3);
    const PoolShape s{N, C, H, W, (H + 2 * ph - kh) / sh + 1, (W + 2 * pw - kw) / sw + 1, kh, kw, sh, sw, ph, pw};
    if (!o.t.defined() || o.t.size(2) != s.Ho || o.t.size(3) != s.Wo || o.t.size(1) != C || o.t.size(0) != N)
      o.t = at::empty({N, C, s.Ho, s.Wo}, x.t.options().memory_format(at::MemoryFormat::ChannelsLast));
    const bool* changed = nullptr;
    if (reference || x.all) {
      o.mark_all();
    } else {
      bool* m = o.fresh_map();
      max_pool_changes(m, x.map(), s);
      changed = m;
    }
    max_pool_positions(o.t.data_ptr<float>(), x.t.data_ptr<float>(), changed, s);
  }
};

// The frame plan: slots, steps in order, and which slots go back to Python.
class FramePlan {
 public:
  FramePlan() { slots_.emplace_back(); }  // slot 0: the input frame

  int64_t conv(int64_t in, std::vector<int64_t> geometry, int64_t kind, int64_t reference, at::Tensor wpack,
               c10::optional<at::Tensor> onednn, at::Tensor weight, c10::optional<at::Tensor> bias, double threshold,
               double scale, int64_t max_rows) {
    check_slot(in);
    auto s = std::make_unique<ConvStep>();
    s->in = in;
    s->out = new_slot();
    s->g = Geometry::parse(geometry);
    TORCH_CHECK(kind == kGemm || kind == kDepthwise, "FramePlan: unknown kernel kind ", kind);
    TORCH_CHECK(reference == kFrame || reference == kBlock, "FramePlan: unknown reference mode ", reference);
    s->kind = static_cast<Kind>(kind);
    s->reference = static_cast<Reference>(reference);
    TORCH_CHECK(wpack.is_contiguous() && wpack.scalar_type() == at::kFloat, "FramePlan: packed weight must be fp32");
    s->wpack = wpack;
    s->onednn = onednn.has_value() ? *onednn : at::Tensor();
    s->weight = weight;
    s->bias = bias.has_value() ? *bias : at::Tensor();
    s->threshold = static_cast<float>(threshold);
    s->scale = static_cast<float>(scale);
    s->max_rows = max_rows;
    s->setup();
    if (reference == kFrame) slots_[in].keep_prev = true;
    const int64_t out = s->out;
    convs_.push_back(s.get());
    steps_.push_back(std::move(s));
    return out;
  }

  int64_t clamp(int64_t a, int64_t b, double lo, double hi) {
    check_slot(a);
    if (b >= 0) check_slot(b);
    auto s = std::make_unique<ClampStep>();
    s->a = a;
    s->b = b;
    s->lo = static_cast<float>(lo);
    s->hi = static_cast<float>(hi);
    s->out = new_slot();
    steps_.push_back(std::move(s));
    return slots_.size() - 1;
  }

  int64_t max_pool(int64_t in, std::vector<int64_t> kernel, std::vector<int64_t> stride, std::vector<int64_t> padding) {
    check_slot(in);
    TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, "FramePlan: max-pool takes 2-D geometry");
    auto s = std::make_unique<MaxPoolStep>();
    s->in = in;
    s->kh = kernel[0], s->kw = kernel[1], s->sh = stride[0], s->sw = stride[1], s->ph = padding[0], s->pw = padding[1];
    s->out = new_slot();
    steps_.push_back(std::move(s));
    return slots_.size() - 1;
  }

  // One frame (N, C, H, W): every step in order; returns the tensors of ``outputs`` (live: updated in place at
  // the next frame). ``reference``: a dense reference frame (a clip's first, or after a reset).
  std::vector<at::Tensor> run(const at::Tensor& x, bool reference, const std::vector<int64_t>& outputs) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
                "FramePlan: the frame must be a 4-D fp32 CPU tensor");
    Slot& input = slots_[0];
    TORCH_CHECK(reference || (input.t.defined() && input.t.sizes() == x.sizes()),
                "FramePlan: a frame of a new shape needs a reference frame");
    const ProfileScope scope(profiling_ ? &profile_ : nullptr);
    {
      const Timer timer(&Profile::frame_in);
      input.t = channels_last(x);
      input.mark_all();
    }
    if (profiling_) {
      step_seconds_.resize(steps_.size());
      for (size_t i = 0; i < steps_.size(); ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        steps_[i]->run(slots_, reference);
        step_seconds_[i] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
    } else {
      for (auto& step : steps_) step->run(slots_, reference);
    }
    const Timer timer(&Profile::prev);
    for (Slot& s : slots_) {
      if (!s.keep_prev) continue;
      if (reference || s.all || !s.prev.defined())
        s.prev = s.t.clone(at::MemoryFormat::ChannelsLast);
      else
        clamp_positions(s.prev.data_ptr<float>(), s.t.data_ptr<float>(), nullptr, s.map(), s.positions(),
                        s.t.size(1), -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity());
    }
    std::vector<at::Tensor> result;
    result.reserve(outputs.size());
    for (int64_t o : outputs) {
      check_slot(o);
      result.push_back(slots_[o].t);
    }
    return result;
  }

  // Time every frame from now on (or stop), by kind of work; timings() reads the sums since the last call.
  void set_profiling(bool on) { profiling_ = on; }
  // Seconds per step (in the order they were added) since the last call.
  std::vector<double> step_timings() {
    std::vector<double> t(steps_.size(), 0.0);
    std::swap(t, step_seconds_);
    step_seconds_.assign(steps_.size(), 0.0);
    return t;
  }
  std::map<std::string, double> timings() {
    const Profile p = profile_;
    profile_ = Profile();
    return {{"gate", p.gate},         {"fused", p.fused},     {"gather", p.gather},   {"gemm", p.gemm},   {"scatter", p.scatter},
            {"depthwise", p.depthwise}, {"dense", p.dense},   {"map", p.map},     {"pointwise", p.pointwise},
            {"pool", p.pool},         {"frame_in", p.frame_in}, {"prev", p.prev}};
  }

  // Output positions each conv recomputed in the last frame, in the order they were added (-1: reference frame).
  std::vector<int64_t> rows() const {
    std::vector<int64_t> r;
    r.reserve(convs_.size());
    for (const ConvStep* c : convs_) r.push_back(c->rows);
    return r;
  }

  // Each conv's block mask of the last frame, bool (N, Bh, Bw), in the order they were added (None: a reference
  // frame, every position computed). The plan reuses it next frame.
  std::vector<std::optional<at::Tensor>> masks() const {
    std::vector<std::optional<at::Tensor>> m;
    m.reserve(convs_.size());
    for (const ConvStep* c : convs_) m.push_back(c->rows < 0 ? std::nullopt : std::optional<at::Tensor>(c->mask_t));
    return m;
  }

 private:
  int64_t new_slot() {
    slots_.emplace_back();
    return slots_.size() - 1;
  }
  void check_slot(int64_t s) const {
    TORCH_CHECK(s >= 0 && s < static_cast<int64_t>(slots_.size()), "FramePlan: no slot ", s);
  }

  // Points the kernels' timers at this plan's profile for one frame.
  struct ProfileScope {
    explicit ProfileScope(Profile* p) { profile = p; }
    ~ProfileScope() { profile = nullptr; }
  };

  bool profiling_ = false;
  Profile profile_;
  std::vector<double> step_seconds_;
  std::vector<Slot> slots_;
  std::vector<std::unique_ptr<Step>> steps_;
  std::vector<ConvStep*> convs_;
};

}  // namespace
}  // namespace gs

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  py::class_<gs::FramePlan>(m, "FramePlan", "A gated network's frame step, run natively (csrc/frame.cpp).")
      .def(py::init<>())
      .def("conv", &gs::FramePlan::conv, py::arg("input"), py::arg("geometry"), py::arg("kind"), py::arg("reference"),
           py::arg("wpack"), py::arg("onednn"), py::arg("weight"), py::arg("bias"), py::arg("threshold"),
           py::arg("scale"), py::arg("max_rows"))
      .def("clamp", &gs::FramePlan::clamp, py::arg("a"), py::arg("b"), py::arg("lo"), py::arg("hi"))
      .def("max_pool", &gs::FramePlan::max_pool, py::arg("input"), py::arg("kernel"), py::arg("stride"),
           py::arg("padding"))
      .def("run", &gs::FramePlan::run, py::arg("x"), py::arg("reference"), py::arg("outputs"))
      .def("rows", &gs::FramePlan::rows)
      .def("masks", &gs::FramePlan::masks)
      .def("set_profiling", &gs::FramePlan::set_profiling, py::arg("on"))
      .def("timings", &gs::FramePlan::timings)
      .def("step_timings", &gs::FramePlan::step_timings);
}
