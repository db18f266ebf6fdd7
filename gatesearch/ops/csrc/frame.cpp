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
#include <memory>

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

// A skip-conv (its eval BN folded in): dense on a reference frame, else the
// gate then the conv step on the active blocks (the dense conv masked to
// them above the crossover, as ops.block_sparse does).
struct ConvStep : Step {
  int64_t in, out;
  Geometry g;
  Kind kind;
  Reference reference;
  at::Tensor wpack, onednn, weight, bias;  // packed for the sparse step; the (folded) conv weight and bias
  float threshold, scale;
  int64_t max_rows;  // above: the dense conv is faster (ops.sparse_rows_limit)
  at::Tensor ref;    // block references (reference kBlock)
  int64_t rows = -1;  // output positions the last frame recomputed (-1: a dense reference frame)

  void run(std::vector<Slot>& slots, bool reference_frame) override {
    const Slot& x = slots[in];
    Slot& z = slots[out];
    if (reference_frame) {
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
    at::Tensor mask_t = at::empty({N, g.Bh, g.Bw}, at::kBool);
    gate(x, mask_t.data_ptr<bool>());
    int64_t M = 0;
    const std::vector<Block> blocks = list_blocks(mask_t, g, &M);
    rows = M;
    block_positions_into(z.fresh_map(), mask_t.data_ptr<bool>(), g, N);
    if (M == 0) return;
    const float* prev = reference == kFrame ? x.prev.data_ptr<float>() : nullptr;
    BlockRef br;
    if (reference == kBlock) br = block_ref(ref, g, x.t);
    if (M > max_rows) {  // denser than the crossover: the dense conv, masked to the active blocks
      if (reference == kBlock) {  // z[active] = conv(x)[active]; references of the active blocks <- x
        const at::Tensor full = conv_dense(x.t, weight, bias, g);
        copy_blocks(z.t, full, blocks);
        const Input in_x(x.t);
        for (const Block& bl : blocks) read_halo(in_x, bl, g, br.at(bl));
      } else {  // z[active] += conv(x - x_prev)[active]
        const at::Tensor r = channels_last(x.t - x.prev);
        const at::Tensor full = conv_dense(r, weight, at::Tensor(), g);
        if (M == N * g.Ho * g.Wo)
          z.t.add_(full);
        else
          add_blocks(z.t, full, blocks);
      }
      return;
    }
    const BlockRef* rf = reference == kBlock ? &br : nullptr;
    if (kind == kGemm)
      gather_gemm_scatter(z.t, x.t, prev, rf, wpack, onednn, blocks, g, M);
    else
      depthwise(z.t, x.t, prev, rf, wpack, blocks, g);
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
        buf.resize(2 * slot + 2 * P);  // halo, the previous frame's halo, scratch
        float* halo = buf.data();
        float* scratch = halo + 2 * slot;
        const Halo h = read_halo(in_x, bl, g, halo);
        if (reference == kBlock) {
          fires = block_fires(halo, br.at(bl), h, C, bl, g, threshold, scale, scratch, true);
        } else {  // the same sums as gate_block_mask, so the same decisions as the per-layer path
          float* old = halo + slot;
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
    input.t = channels_last(x);
    input.mark_all();
    for (auto& step : steps_) step->run(slots_, reference);
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

  // Output positions each conv recomputed in the last frame, in the order they were added (-1: reference frame).
  std::vector<int64_t> rows() const {
    std::vector<int64_t> r;
    r.reserve(convs_.size());
    for (const ConvStep* c : convs_) r.push_back(c->rows);
    return r;
  }

 private:
  int64_t new_slot() {
    slots_.emplace_back();
    return slots_.size() - 1;
  }
  void check_slot(int64_t s) const {
    TORCH_CHECK(s >= 0 && s < static_cast<int64_t>(slots_.size()), "FramePlan: no slot ", s);
  }

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
      .def("rows", &gs::FramePlan::rows);
}
