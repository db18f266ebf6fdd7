// The skip-conv step of a native frame plan (frame.cpp): Skip-Convolutions'
// Eq. 3 for one layer — dense on a reference frame, else the norm gate
// (Eq. 5 / 7) then the conv on the active blocks, or the dense conv masked
// to them when the frame is denser than the machine's crossover.
//
// Layers whose weight stays in cache (and depthwise ones) take the
// per-block path: one team of threads spans the whole layer. Phase 1 shares
// the blocks out dynamically: a block whose input halo changed is read once,
// its residual formed and tested, and when it fires the residual is kept
// for phase 2 (and its reference refreshed). Between the phases one thread
// lists the fired blocks: the layer's density is then known for *this*
// frame, and above the crossover the layer takes the dense conv instead
// (no guess from the previous frame, so the first residual frame after a
// reference is routed like any other). Phase 2 shares (panel group of 32
// output channels x fired block) units: at low density a layer fires a
// handful of blocks, and whole blocks as the unit left one thread idle
// while the other finished the last block. No Python, no library call and
// no gathered matrix anywhere in the layer.
//
// Larger layers gate first and multiply the gathered active rows in one
// GEMM (gather_gemm.cpp), whose library call parallelises it.

#include <omp.h>

#include <atomic>
#include <chrono>

#include "frame.h"

namespace gs {
namespace {

// Weights up to this size run the per-block kernel (block_conv.cpp: each unit streams its panels of the weight,
// which has to stay in the core's cache); larger ones the gather -> one GEMM -> scatter path. 2 MiB (a core's L2
// here) takes ResNet-18's layer3.0.conv1 (128 -> 256, 1.2 MB): 0.20 -> 0.12 ms per residual frame on vtest.avi at
// 2 threads; its 256 -> 256 convs (2.4 MB) and layer4 ran no faster or slower on the per-block kernel (see
// docs/benchmarks.md, "224² nets").
constexpr int64_t kBlockKernelBytes = 2 << 20;
// Below this many multiply-adds (the last frame's) a layer's step runs on one thread: waking the other costs more.
constexpr double kParallelMacs = 2e5;
// Output-channel panels (16 channels each) per phase-2 unit: the register-blocked kernel's width.
constexpr int64_t kPanelsPerUnit = 2;
// Teams up to this size share phase 2 out by who gated which block (larger ones: one dynamic loop).
constexpr int kMaxTeam = 64;

// The dense conv of x (bias undefined: none), as F.conv2d runs it.
at::Tensor conv_dense(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const Geometry& g) {
  const c10::optional<at::Tensor> b = bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  return at::conv2d(x, weight, b, {g.sh, g.sw}, {g.ph, g.pw}, {g.dh, g.dw}, g.groups);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// z[blocks] = src[blocks] (copy) or z[blocks] += src[blocks].
void for_positions(const at::Tensor& z, const at::Tensor& src, const std::vector<Block>& blocks, bool copy) {
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

}  // namespace

void ConvStep::setup() {
  const int64_t Ci = weight.size(1) * g.groups, Co = weight.size(0);
  macs_per_row = static_cast<double>(g.taps()) * (Ci / g.groups) * Co;
  if (kind == kDepthwise) {
    per_block = true;
  } else if (g.groups == 1 && wpack.numel() * 4 <= kBlockKernelBytes) {
    panels = pack_panels(wpack);
    per_block = true;
  }
}

void ConvStep::run(std::vector<Slot>& slots, bool reference_frame) {
  const Slot& x = slots[in];
  Slot& z = slots[out];
  if (reference_frame) {
    reference_step(x, z);
    return;
  }
  const int64_t N = x.t.size(0);
  if (!mask_t.defined() || mask_t.size(0) != N) mask_t = at::empty({N, g.Bh, g.Bw}, at::kBool);
  if (per_block)
    per_block_step(x, z, mask_t.data_ptr<bool>());
  else
    gemm_step(x, z, mask_t.data_ptr<bool>());
}

// z = conv(x); every block's reference <- its halo of x.
void ConvStep::reference_step(const Slot& x, Slot& z) {
  const Timer timer(&Profile::dense);
  z.t = channels_last(conv_dense(x.t, weight, bias, g));
  z.mark_all();
  if (reference == kBlock) {
    const int64_t size = x.t.size(0) * g.Bh * g.Bw * g.slot(x.t.size(1));
    if (!ref.defined() || ref.numel() != size) ref = at::empty({size}, x.t.options());
    const BlockRef br = block_ref(ref, g, x.t);
    const Input in_x(x.t);
    for_blocks(g, in_x.N, nullptr, br.slot,
               [&](const Block& bl, std::vector<float>&) { read_halo(in_x, bl, g, br.at(bl)); });
  }
  rows = -1;
}

// Gate, decide, compute: one team over the whole layer (see the file's comment).
void ConvStep::per_block_step(const Slot& x, Slot& z, bool* mask) {
  const int64_t N = x.t.size(0), nb = N * g.Bh * g.Bw, slot = g.slot(x.t.size(1));
  if (!residuals.defined() || residuals.numel() != nb * slot) residuals = at::empty({nb * slot}, x.t.options());
  float* res = residuals.data_ptr<float>();
  const bool parallel = (rows < 0 ? N * g.Ho * g.Wo : rows) * macs_per_row >= kParallelMacs;
  const int threads = at::get_num_threads();
  const int team = parallel && threads > 1 && !at::in_parallel_region() ? threads : 1;
  const int64_t groups = kind == kDepthwise ? 1 : (panels.panels + kPanelsPerUnit - 1) / kPanelsPerUnit;
  const int64_t chunk = std::max<int64_t>(1, (nb + 8 * team - 1) / (8 * team));  // phase 1: ~8 grabs per thread
  const Strides zs(z.t);
  float* zp = z.t.data_ptr<float>();
  std::vector<Block> blocks;
  // Phase 2 with a team: each thread first the units of the blocks it gated (their residual halos are in its
  // core's cache), then helps the others. Kept across frames (per calling thread): no allocation per frame.
  static thread_local std::vector<int8_t> owners;
  static thread_local std::vector<std::vector<int64_t>> queues;
  std::vector<int8_t>& owner = owners;  // the calling thread's: the team reaches them through these references
  std::vector<std::vector<int64_t>>& queue = queues;
  std::atomic<int64_t> head[kMaxTeam];
  const bool local = team > 1 && team <= kMaxTeam;
  if (local) {
    owner.resize(nb);
    queue.resize(team);
    for (auto& q : queue) q.clear();
  }
  bool dense = false;
  const bool timing = profile != nullptr;
  const auto t0 = std::chrono::steady_clock::now();
  double gated = 0;
#pragma omp parallel num_threads(team)
  {
    Scratch s;
    const int me = omp_get_thread_num();
    // runs of neighbouring blocks per grab: their halos overlap, so a thread reads the shared columns once
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < nb; ++i) {
      mask[i] = gate_block(x, g.block(i / (g.Bh * g.Bw), (i / g.Bw) % g.Bh, i % g.Bw), s, res + i * slot);
      if (local) owner[i] = static_cast<int8_t>(me);
    }
#pragma omp single
    {
      if (timing) gated = seconds_since(t0);
      rows = finish(z, mask, N, &blocks);
      dense = rows > max_rows;
      if (local) {
        for (int64_t k = 0; k < static_cast<int64_t>(blocks.size()); ++k)
          queue[owner[g.cell(blocks[k])]].push_back(k);
        for (int t = 0; t < team; ++t) head[t].store(0, std::memory_order_relaxed);
      }
    }
    if (!dense && !local) {
      const int64_t nf = blocks.size();
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < nf * groups; ++u) {  // panel-major: a thread's next unit reuses its panels
        const Block& bl = blocks[u % nf];
        compute_block(res + g.cell(bl) * slot, bl, u / nf, s, zp, zs);
      }
    } else if (!dense) {
      // (panel group x fired block) units: each thread first those of the blocks it gated (no residual halo to
      // pull from the other core), panel-major so its next unit reuses its panels; then it helps the others.
      for (int q = 0; q < team; ++q) {
        const int t = (me + q) % team;
        const std::vector<int64_t>& own = queue[t];
        const int64_t nu = static_cast<int64_t>(own.size()) * groups;
        for (int64_t u; (u = head[t].fetch_add(1, std::memory_order_relaxed)) < nu;) {
          const Block& bl = blocks[own[u % own.size()]];
          compute_block(res + g.cell(bl) * slot, bl, u / own.size(), s, zp, zs);
        }
      }
    }
  }
  if (timing) {
    profile->gate += gated;
    if (!dense && rows > 0) profile->fused += seconds_since(t0) - gated;
  }
  if (dense && rows > 0) dense_step(x, z, blocks, true);
}

// One block: its residual halo r (against the previous frame or its reference), unread when the halo holds no
// changed input; returns whether it fires (Eq. 5 / 7), and then its reference is refreshed.
bool ConvStep::gate_block(const Slot& x, const Block& bl, Scratch& s, float* r) const {
  const bool* changed = x.map();
  const Input in_x(x.t);
  const int64_t C = in_x.C;
  // an unchanged halo has r = 0: the norm gate stays shut, the Gumbel gate reads f = bias
  if (changed && !halo_changed(changed, in_x.H, in_x.W, bl, g) && !(linear.on() && linear.bias > 0)) return false;
  const Halo h = g.halo(bl);
  const int64_t n = h.ph * h.pw * C;
  s.work.resize(n + 2 * h.ph * h.pw);
  if (reference == kBlock) {  // the gate on |x - ref| straight from the halo; r = x - ref only when it fires
    float* ref_slot = ref.data_ptr<float>() + g.cell(bl) * g.slot(C);
    if (halo_quiet(in_x, bl, g, ref_slot, threshold, scale)) return false;  // nothing to copy
    s.x.resize(n);
    float* xv = s.x.data();
    read_halo(in_x, bl, g, xv);
    if (!block_fires(xv, ref_slot, h, C, bl, g, threshold, scale, s.work.data(), true)) return false;
    for (int64_t i = 0; i < n; ++i) {  // only fired blocks reach phase 2 (the residual in their slot); their
      r[i] = xv[i] - ref_slot[i];      // reference <- this halo
      ref_slot[i] = xv[i];
    }
    return true;
  }
  // r = x - x_prev
  load_patch(Input(x.t, x.prev.data_ptr<float>()), bl.n, h, s.r);
  const bool fires = linear.on() ? linear.fires(s.r.data(), nullptr, h, C, bl, g, s.work.data())
                                 : block_fires(s.r.data(), nullptr, h, C, bl, g, threshold, scale, s.work.data(),
                                               false);
  if (!fires) return false;
  std::memcpy(r, s.r.data(), n * sizeof(float));  // only fired blocks reach phase 2
  return true;
}

// z += conv(r) on one fired block, output channels of one unit's panel group (all of them when depthwise).
void ConvStep::compute_block(const float* r, const Block& bl, int64_t group, Scratch& s, float* zp,
                             const Strides& zs) const {
  const Halo h = g.halo(bl);
  const int64_t C = weight.size(1) * g.groups;  // input channels
  if (kind == kDepthwise) {
    const int64_t Co = weight.size(0);
    s.acc.resize(Co);
    depthwise_block(r, h, C, bl, g, wpack.data_ptr<float>(), Co, zp, zs, s.acc.data());
  } else {
    const int64_t p0 = group * kPanelsPerUnit;
    block_conv(r, h, C, bl, g, panels, zp, zs, p0, std::min(p0 + kPanelsPerUnit, panels.panels));
  }
}

// The gather -> GEMM -> scatter path: the gate over all blocks, then (below the crossover) the GEMM of the
// active rows, else the dense conv masked to the active blocks.
void ConvStep::gemm_step(const Slot& x, Slot& z, bool* mask) {
  {
    const Timer timer(&Profile::gate);
    gate(x, mask);
  }
  std::vector<Block> blocks;
  rows = finish(z, mask, x.t.size(0), &blocks);
  if (rows == 0) return;
  if (rows > max_rows) {
    dense_step(x, z, blocks, false);
    return;
  }
  const float* prev = reference == kFrame ? x.prev.data_ptr<float>() : nullptr;
  BlockRef br;
  if (reference == kBlock) br = block_ref(ref, g, x.t);
  gather_gemm_scatter(z.t, x.t, prev, reference == kBlock ? &br : nullptr, wpack, onednn, blocks, g, rows);
}

// The map of z's changed positions from the mask; returns the recomputed positions (and lists the blocks).
int64_t ConvStep::finish(Slot& z, const bool* mask, int64_t N, std::vector<Block>* blocks) const {
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

// Denser than the crossover: the dense conv, masked to the active blocks (``refs_fresh``: the gate already
// refreshed the active blocks' references).
void ConvStep::dense_step(const Slot& x, Slot& z, const std::vector<Block>& blocks, bool refs_fresh) {
  const Timer timer(&Profile::dense);
  const int64_t N = x.t.size(0);
  if (reference == kBlock) {  // z[active] = conv(x)[active]; references of the active blocks <- x
    const at::Tensor full = conv_dense(x.t, weight, bias, g);
    for_positions(z.t, full, blocks, true);
    if (refs_fresh) return;
    const BlockRef br = block_ref(ref, g, x.t);
    const Input in_x(x.t);
    for (const Block& bl : blocks) read_halo(in_x, bl, g, br.at(bl));
  } else {  // z[active] += conv(x - x_prev)[active]
    const at::Tensor r = channels_last(x.t - x.prev);
    const at::Tensor full = conv_dense(r, weight, at::Tensor(), g);
    if (rows == N * g.Ho * g.Wo)
      z.t.add_(full);
    else
      for_positions(z.t, full, blocks, false);
  }
}

// mask[block] <- the norm gate (Eq. 5 / 7) against the previous frame or the block's reference; blocks whose input
// halo holds no changed position are not read (their residual cannot have grown).
void ConvStep::gate(const Slot& x, bool* mask) const {
  const Input in_x(x.t);
  const int64_t C = in_x.C, H = in_x.H, W = in_x.W, slot = g.slot(C), P = slot / C;
  const bool* changed = x.map();
  BlockRef br;
  if (reference == kBlock) br = block_ref(ref, g, x.t);
  const Input in_prev = reference == kFrame ? Input(x.prev) : in_x;
  for_blocks(g, in_x.N, nullptr, slot, [&](const Block& bl, std::vector<float>& buf) {
    bool fires = false;
    if (!changed || halo_changed(changed, H, W, bl, g) || (linear.on() && linear.bias > 0)) {
      buf.resize(3 * slot + 2 * P);  // halo, the previous frame's halo, scratch
      float* halo = buf.data();
      float* old = halo + slot;
      float* scratch = halo + 2 * slot;
      const Halo h = read_halo(in_x, bl, g, halo);
      if (linear.on()) {  // frame reference only (the Gumbel gate has no block references)
        read_halo(in_prev, bl, g, old);
        fires = linear.fires(halo, old, h, C, bl, g, scratch);
      } else if (reference == kBlock) {
        fires = block_fires(halo, br.at(bl), h, C, bl, g, threshold, scale, scratch, true);
      } else {  // the same sums as gate_block_mask, so the same decisions as the per-layer path
        read_halo(in_prev, bl, g, old);
        fires = block_fires(halo, old, h, C, bl, g, threshold, scale, scratch, false);
      }
    }
    mask[g.cell(bl)] = fires;
  });
}

}  // namespace gs
