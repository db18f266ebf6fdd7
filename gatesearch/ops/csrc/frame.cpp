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
// Slots and steps: frame.h; the skip-conv step: conv_step.cpp.

#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "dstep_step.h"
#include "frame.h"

namespace gs {
namespace {

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

  // The last conv added gates with the Gumbel gate (Eq. 8 at inference; gumbel_gate.cpp) instead of its norm gate.
  void gumbel_gate(at::Tensor wpack, double bias) {
    TORCH_CHECK(!convs_.empty(), "FramePlan: a Gumbel gate needs a conv before it");
    ConvStep* c = convs_.back();
    TORCH_CHECK(c->reference == kFrame, "FramePlan: the Gumbel gate gates against the previous frame only");
    const int64_t Ci = c->weight.size(1) * c->g.groups;
    TORCH_CHECK(wpack.is_contiguous() && wpack.scalar_type() == at::kFloat && wpack.numel() == c->g.kh * c->g.kw * Ci,
                "FramePlan: the Gumbel gate's weight must be fp32 (kh*kw, Ci)");
    c->linear.weight = wpack;
    c->linear.bias = static_cast<float>(bias);
  }

  // Nearest upsampling of slot ``in`` (H, W) by index tables: output row y reads input row iy[y] (likewise ix).
  int64_t upsample(int64_t in, std::vector<int64_t> iy, std::vector<int64_t> ix, int64_t H, int64_t W) {
    check_slot(in);
    const int64_t out = new_slot();
    steps_.push_back(upsample_step(in, out, std::move(iy), std::move(ix), H, W));
    return out;
  }

  // The clip head's pooling of slot ``in`` (backbones/base.py: frame_pool): its (N, C * grid^2 + C) slot is 2-D,
  // for Python only (no step reads it).
  int64_t head_pool(int64_t in, int64_t grid) {
    check_slot(in);
    const int64_t out = new_slot();
    steps_.push_back(head_pool_step(in, out, grid));
    return out;
  }

  // A plain conv, dense every frame (its eval BN folded in): [sh, sw, ph, pw, dh, dw, groups] (dstep_step.cpp).
  int64_t dense_conv(int64_t in, at::Tensor weight, c10::optional<at::Tensor> bias, std::vector<int64_t> geometry) {
    check_slot(in);
    const int64_t out = new_slot();
    steps_.push_back(dense_conv_step(in, out, weight, bias, std::move(geometry)));
    return out;
  }

  // A D-STEP residual block reading slot ``in`` (dstep_step.h); its branch convs follow, each by dstep_level.
  // grid: [p, input tile side, Gh, Gw]; ds_geometry: the folded downsample conv's stride, padding, dilation.
  int64_t dstep(int64_t in, at::Tensor spatial, double spatial_bias, at::Tensor fc1_w, at::Tensor fc1_b,
                at::Tensor fc2_w, at::Tensor fc2_b, std::vector<int64_t> grid, std::vector<double> in_area,
                int64_t shift_fold, c10::optional<at::Tensor> ds_weight, c10::optional<at::Tensor> ds_bias,
                std::vector<int64_t> ds_geometry, bool sparse_only) {
    check_slot(in);
    TORCH_CHECK(grid.size() == 4 && static_cast<int64_t>(in_area.size()) == grid[2] * grid[3],
                "FramePlan: a D-STEP block takes [p, input tile, Gh, Gw] and Gh*Gw tile areas");
    auto s = std::make_unique<DStepStep>();
    s->in = in;
    s->out = new_slot();
    s->spatial = spatial.contiguous();
    s->spatial_bias = static_cast<float>(spatial_bias);
    s->fc1_w = fc1_w.contiguous(), s->fc1_b = fc1_b.contiguous(), s->fc2_w = fc2_w.contiguous();
    s->fc2_b = fc2_b.contiguous();
    s->tile = grid[0], s->in_tile = grid[1], s->Gh = grid[2], s->Gw = grid[3];
    s->in_area.assign(in_area.begin(), in_area.end());
    s->shift_fold = shift_fold;
    if (ds_weight.has_value()) {
      TORCH_CHECK(ds_geometry.size() == 6, "FramePlan: the downsample conv takes stride, padding, dilation");
      s->ds_weight = ds_weight->contiguous();
      s->ds_bias = ds_bias.has_value() ? ds_bias->contiguous() : at::Tensor();
      s->ds_geometry = std::move(ds_geometry);
    }
    s->sparse_only = sparse_only;
    const int64_t out = s->out;
    dsteps_.push_back(s.get());
    steps_.push_back(std::move(s));
    return out;
  }

  // The next conv of the last D-STEP block's branch, BN folded: geometry [sh, sw, ph, pw, dh, dw, q, Ho, Wo].
  void dstep_level(at::Tensor weight, at::Tensor bias, std::vector<int64_t> geometry, std::vector<int64_t> rows,
                   std::vector<int64_t> cols, std::vector<double> area, bool same_grid, double crossover) {
    TORCH_CHECK(!dsteps_.empty(), "FramePlan: a D-STEP conv needs a D-STEP block before it");
    TORCH_CHECK(geometry.size() == 9 && area.size() == rows.size() * cols.size() && weight.dim() == 4,
                "FramePlan: a D-STEP conv takes 9 geometry ints and one area per tile");
    DStepStep* b = dsteps_.back();
    DStepLevel L;
    L.weight = weight.contiguous();
    L.bias = bias.contiguous();
    const int64_t co = weight.size(0), ci = weight.size(1), taps = weight.size(2) * weight.size(3);
    L.gemm = L.weight.reshape({co, ci, taps}).permute({2, 1, 0}).contiguous();
    L.sh = geometry[0], L.sw = geometry[1], L.ph = geometry[2], L.pw = geometry[3], L.dh = geometry[4];
    L.dw = geometry[5], L.tile = geometry[6], L.Ho = geometry[7], L.Wo = geometry[8];
    for (int64_t r : rows) TORCH_CHECK(r >= 0 && r < b->Gh, "FramePlan: D-STEP tile row outside the grid");
    for (int64_t c : cols) TORCH_CHECK(c >= 0 && c < b->Gw, "FramePlan: D-STEP tile column outside the grid");
    L.rows = std::move(rows), L.cols = std::move(cols);
    L.area.assign(area.begin(), area.end());
    L.same_grid = same_grid;
    L.crossover = crossover;
    b->levels.push_back(std::move(L));
  }

  // Per D-STEP block (in the order added), per stream, the last frame's [area of each conv..., skip, reuse,
  // compute]: what DStepBlock._infer records (policies/dstep/flops.py: record_frame).
  std::vector<std::vector<std::vector<double>>> dstep_stats() const {
    std::vector<std::vector<std::vector<double>>> s;
    s.reserve(dsteps_.size());
    for (const DStepStep* b : dsteps_) s.push_back(b->stats);
    return s;
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
  std::vector<DStepStep*> dsteps_;
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
      .def("gumbel_gate", &gs::FramePlan::gumbel_gate, py::arg("wpack"), py::arg("bias"))
      .def("upsample", &gs::FramePlan::upsample, py::arg("input"), py::arg("iy"), py::arg("ix"), py::arg("height"),
           py::arg("width"))
      .def("head_pool", &gs::FramePlan::head_pool, py::arg("input"), py::arg("grid"))
      .def("dense_conv", &gs::FramePlan::dense_conv, py::arg("input"), py::arg("weight"), py::arg("bias"),
           py::arg("geometry"))
      .def("dstep", &gs::FramePlan::dstep, py::arg("input"), py::arg("spatial"), py::arg("spatial_bias"),
           py::arg("fc1_weight"), py::arg("fc1_bias"), py::arg("fc2_weight"), py::arg("fc2_bias"), py::arg("grid"),
           py::arg("in_area"), py::arg("shift_fold"), py::arg("ds_weight"), py::arg("ds_bias"),
           py::arg("ds_geometry"), py::arg("sparse_only"))
      .def("dstep_level", &gs::FramePlan::dstep_level, py::arg("weight"), py::arg("bias"), py::arg("geometry"),
           py::arg("rows"), py::arg("cols"), py::arg("area"), py::arg("same_grid"), py::arg("crossover"))
      .def("dstep_stats", &gs::FramePlan::dstep_stats)
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
