// T's construction for one image, written once for a whole thread block: stage the metric, its
// norms, the removal keys (ToMe's A rows against B columns, or the score), the removed set by exact
// rank, then dst/weight (top-k over the kept targets, softmax). match.cu runs it with one CUDA
// block per image, transform.cu fused with the apply (transform_image.cuh); tests/cuda_on_host/
// runs the same source on the CPU (see portable.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../tt.h"
#include "pack.cuh"
#include "portable.h"

namespace tt {
namespace image {

constexpr int kNone = 0x7fffffff;   // no candidate: an index above every token
constexpr int kBlockThreads = 256;  // of the match and transform kernels' blocks

// What every image of a launch shares.
struct Step {
  int N, D, K, P, r, n_keep;
  int rows_per_chunk;  // affinity rows held in shared memory at once
  int metric_ld;       // row stride of the staged metric, 0 when it is read from global memory
  bool metric_packed;  // affinities read the metric in 16-byte packs (see metric_packs)
  Method method;
  bool by_importance, mix, targets_b, ward, needs_affinity;
  float tau, w_red, w_imp;
};

// The step of construction `c` on a metric of D channels (0: none), before its plan.
inline Step make_step(const Construction& c, int64_t D) {
  Step s{};
  s.N = static_cast<int>(c.tokens);
  s.D = static_cast<int>(D);
  s.K = static_cast<int>(c.slots());
  s.P = static_cast<int>(c.prefix);
  s.r = static_cast<int>(c.r);
  s.n_keep = static_cast<int>(n_keep(c.method, c.tokens, c.r, c.prefix));
  s.method = c.method;
  s.by_importance = c.by_importance();
  s.mix = !s.by_importance && c.alpha > 0;
  s.targets_b = c.targets_b;
  s.ward = c.ward;
  s.needs_affinity = !s.by_importance || c.method == Method::Spread;
  s.tau = static_cast<float>(c.tau);
  s.w_red = static_cast<float>(1.0 - c.alpha);
  s.w_imp = static_cast<float>(c.alpha);
  return s;
}

// Whether the affinities may read the metric in 16-byte packs: D a whole number of packs and
// every row 16-byte aligned (always so once staged).
template <typename metric_t>
inline bool metric_packs(int D, bool staged, const metric_t* ptr, int64_t sn, int64_t sb) {
  constexpr int V = 16 / sizeof(metric_t);
  const bool rows_aligned =
      staged || (reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && sn % V == 0 && sb % V == 0);
  return D % V == 0 && rows_aligned;
}

// Row stride of a staged metric, so that threads reading consecutive rows at the same column hit
// distinct shared-memory banks: an odd number of 16-byte units when read in packs, else of 4-byte
// words.
inline int staged_ld(int D, int elem_bytes, bool packed) {
  if (packed) {
    const int V = 16 / elem_bytes, units = (D + V - 1) / V;
    return (units | 1) * V;
  }
  if (elem_bytes == 4) return D | 1;
  return D + ((2 - D % 4) + 4) % 4;  // 2-byte elements: ld = 2 (mod 4)
}

// Shared memory of one image's construction, in 4-byte words from the start; the staged metric
// follows.
struct Layout {
  int inv_norm, key, best, keep, row_of, removed, cand_val, cand_tok, sim, words;
  TT_HOST_DEVICE int64_t bytes(const Step& s, int metric_bytes) const {
    return (static_cast<int64_t>(words) * 4 + 15) / 16 * 16 +
           static_cast<int64_t>(s.metric_ld) * s.N * metric_bytes;
  }
};

TT_HOST_DEVICE Layout layout(const Step& s) {
  Layout l{};
  int at = 0;
  const auto take = [&](int words) { const int here = at; at += words; return here; };
  l.inv_norm = take(s.N);
  l.key = take(s.N);
  l.best = take(s.N);
  l.keep = take(s.N);
  l.row_of = take(s.N);
  l.removed = take(s.N);
  l.cand_val = take(s.rows_per_chunk * s.K);
  l.cand_tok = take(s.rows_per_chunk * s.K);
  l.sim = take(s.rows_per_chunk * s.N);
  l.words = at;
  return l;
}

// Picks whether the metric is staged in shared memory (preferred) and the affinity rows per chunk
// (largest first) so that the block's shared memory, the construction's or `apply_bytes` (the
// fused apply's, in the same memory once T is built; 0 for tt.match) whichever is larger, fits
// in `limit` bytes; returns those bytes, or 0 when nothing fits. `metric` (rows sn apart, images sb
// apart) may be null when the construction reads no metric.
template <typename metric_t>
inline int64_t plan(Step& s, const metric_t* metric, int64_t sn, int64_t sb, int64_t limit,
                    int64_t apply_bytes) {
  for (const bool staged : {true, false}) {
    if (staged && !s.needs_affinity) continue;
    s.metric_packed = s.needs_affinity && metric_packs(s.D, staged, metric, sn, sb);
    s.metric_ld = staged ? staged_ld(s.D, sizeof(metric_t), s.metric_packed) : 0;
    for (const int rows : {32, 8, 1}) {
      s.rows_per_chunk = rows;
      const int64_t bytes = std::max(layout(s).bytes(s, sizeof(metric_t)), apply_bytes);
      if (bytes <= limit) return bytes;
    }
  }
  return 0;
}

// One image's tensors (image(s, b): image b of a batch that starts here).
template <typename metric_t>
struct MatchImage {
  const metric_t* metric;  // rows metric_sn apart, channels contiguous; images metric_sb apart
  int64_t metric_sn, metric_sb;
  const float* score;  // null when not given (the construction does not read it)
  const float* size;
  int64_t* dst;
  float* weight;
  // The A tokens' removal keys and best B tokens (indexed by token), when keys_image computed
  // them in blocks of their own (small batches); null: match_image computes them.
  const float* key_in;
  const int* best_in;

  TT_DEVICE MatchImage image(const Step& s, int64_t b) const {
    MatchImage im = *this;
    const int64_t n = s.N, nk = static_cast<int64_t>(s.N) * s.K;
    im.metric = metric + b * metric_sb;
    if (score) im.score = score + b * n;
    im.size = size + b * n;
    im.dst = dst + b * nk;
    im.weight = weight + b * nk;
    if (key_in) {
      im.key_in = key_in + b * n;
      im.best_in = best_in + b * n;
    }
    return im;
  }
};

// Host side of a launch (match.cu, transform.cu, and tests/cuda_on_host).

// The metric as the kernels read it: in `dtype` or else widened to fp32 (exactly), so that few
// dtype pairs are compiled; channels contiguous, so that rows load as vectors. A per-head metric
// [B, H, N, D] is summed over its heads first, in fp32 (one reduction).
inline at::Tensor kernel_metric(at::Tensor metric, at::ScalarType dtype) {
  if (!metric.defined()) return metric;
  if (metric.dim() == 4) metric = metric.sum(1, false, at::kFloat);
  if (metric.scalar_type() != dtype) metric = metric.to(at::kFloat);
  return metric.stride(2) == 1 ? metric : metric.contiguous();
}

// The kernels' view of a batch; metric and score may be undefined, and dst and weight too for
// the keys blocks (which write key/best instead).
template <typename metric_t>
MatchImage<metric_t> make_match_image(const at::Tensor& metric, const at::Tensor& score,
                                      const at::Tensor& size, const at::Tensor& dst,
                                      const at::Tensor& weight) {
  MatchImage<metric_t> first{};
  if (metric.defined()) {
    first.metric = metric.data_ptr<metric_t>();
    first.metric_sn = metric.stride(1);
    first.metric_sb = metric.stride(0);
  }
  first.score = score.defined() ? score.data_ptr<float>() : nullptr;
  first.size = size.data_ptr<float>();
  first.dst = dst.defined() ? dst.data_ptr<int64_t>() : nullptr;
  first.weight = weight.defined() ? weight.data_ptr<float>() : nullptr;
  return first;
}

// image::plan for a metric tensor (possibly undefined).
template <typename metric_t>
int64_t plan_for(Step& s, const at::Tensor& metric, int64_t limit, int64_t apply_bytes) {
  if (!metric.defined()) return plan<metric_t>(s, nullptr, 0, 0, limit, apply_bytes);
  return plan(s, metric.data_ptr<metric_t>(), metric.stride(1), metric.stride(0), limit,
              apply_bytes);
}

// 1 / |metric row t| of every token (the cosine of a zero row is 0, as in the reference: norms
// clamped at NORM_EPS).
template <typename Exec, typename metric_t>
TT_DEVICE void inverse_norms(Exec& ex, const Step& s, const metric_t* m, int64_t sn,
                             float* inv_norm) {
  ex.for_each(s.N, [&](int t) {
    float square = 0.f;
    for (int d = 0; d < s.D; ++d) {
      const float v = static_cast<float>(m[t * sn + d]);
      square += v * v;
    }
    inv_norm[t] = 1.f / fmaxf(sqrtf(square), NORM_EPS);
  });
}

// How much tokens i and t want to merge: their cosine, or minus Ward's merge cost
// size_i size_t / (size_i + size_t) (1 - cos). Every block that computes an affinity computes it
// so, in the same order, whether the metric is staged or read in place, packed or not.
template <typename metric_t>
struct Affinity {
  const Step& s;
  const metric_t* m;  // rows sn apart
  int64_t sn;
  const float* inv_norm;
  const float* size;
  TT_DEVICE float operator()(int i, int t) const {
    const metric_t* a = m + i * sn;
    const metric_t* b = m + t * sn;
    float dot = 0.f;
    if (s.metric_packed) {  // the same sums in the same order, from 16-byte loads
      constexpr int MV = 16 / sizeof(metric_t);
      TT_UNROLL(unroll 2)  // registers: each step holds two packs
      for (int d = 0; d < s.D; d += MV) {
        const Pack<metric_t, MV> pa = load_pack<MV>(a + d), pb = load_pack<MV>(b + d);
        for (int v = 0; v < MV; ++v)
          dot += static_cast<float>(pa.v[v]) * static_cast<float>(pb.v[v]);
      }
    } else {
      for (int d = 0; d < s.D; ++d) dot += static_cast<float>(a[d]) * static_cast<float>(b[d]);
    }
    dot *= inv_norm[i] * inv_norm[t];
    if (!s.ward) return dot;
    const float pair = size[i] * size[t] / fmaxf(size[i] + size[t], SCORE_EPS);
    return -(pair * (1.f - dot));
  }
};

// ToMe's bipartite split: A tokens (may leave) from a0 on and B tokens from b0 on, every other.
struct Bipartite {
  int a0, b0, nA, nB;
  TT_HOST_DEVICE explicit Bipartite(const Step& s)
      : a0(static_cast<int>(first_a(s.P))), b0(s.P + 1 - s.P % 2),
        nA(static_cast<int>(a_count(s.N, s.P))),
        nB((s.N - b0 + 1 > 0 ? s.N - b0 + 1 : 0) / 2) {}
};

// The removal keys of the A tokens [begin, end) (by A index): each one's best affinity to a B
// token, and which B token that is (ties to the lower index), written to key/best by token;
// `sim` holds rows_per_chunk x nB affinities.
template <typename Exec, typename metric_t>
TT_DEVICE void best_b_keys(Exec& ex, const Step& s, const Affinity<metric_t>& affinity, int begin,
                           int end, float* key, int* best, float* sim) {
  const Bipartite ab(s);
  const int nB = ab.nB, RB = s.rows_per_chunk;
  for (int c0 = begin; c0 < end; c0 += RB) {
    const int rows = std::min(RB, end - c0);
    ex.for_each(rows * nB, [&](int e) {
      sim[e] = affinity(ab.a0 + 2 * (c0 + e / nB), ab.b0 + 2 * (e % nB));
    });
    ex.for_each_warp(rows, [&](int i, int lane, int lanes, int) {
      float top = -INFINITY;
      int arg = kNone;
      for (int c = lane; c < nB; c += lanes)
        if (sim[i * nB + c] > top) top = sim[i * nB + c], arg = c;
      ex.warp_argmax(top, arg);
      if (lane > 0) return;
      const int a = ab.a0 + 2 * (c0 + i);
      key[a] = top;
      best[a] = arg == kNone ? 0 : ab.b0 + 2 * arg;
    });
  }
}

// Small batches: one image's removal keys over `parts` blocks (keys_image), before the block of
// match_image that reads them. Shared memory: the inverse norms and a chunk of affinities.
TT_HOST_DEVICE int64_t keys_bytes(const Step& s) {
  return 4 * (static_cast<int64_t>(s.N) + static_cast<int64_t>(s.rows_per_chunk) * Bipartite(s).nB);
}

// The keys blocks' plan: the metric read in place, the most affinity rows per chunk that fit in
// `limit` bytes; 0 when none does.
template <typename metric_t>
inline int64_t plan_keys(Step& s, const metric_t* metric, int64_t sn, int64_t sb, int64_t limit) {
  s.metric_ld = 0;
  s.metric_packed = metric_packs(s.D, false, metric, sn, sb);
  for (const int rows : {32, 8, 1}) {
    s.rows_per_chunk = rows;
    if (keys_bytes(s) <= limit) return keys_bytes(s);
  }
  return 0;
}

// Part `part` of `parts` of one image's removal keys: its share of the A tokens, into key/best
// (the image's [N] arrays in global memory).
template <typename Exec, typename metric_t>
TT_DEVICE void keys_image(Exec& ex, const Step& s, const MatchImage<metric_t>& im, float* key,
                          int* best, int part, int parts, void* shared) {
  float* inv_norm = static_cast<float*>(shared);
  float* sim = inv_norm + s.N;
  inverse_norms(ex, s, im.metric, im.metric_sn, inv_norm);
  const Affinity<metric_t> affinity{s, im.metric, im.metric_sn, inv_norm, im.size};
  const int nA = Bipartite(s).nA;
  best_b_keys(ex, s, affinity, static_cast<int>(static_cast<int64_t>(nA) * part / parts),
              static_cast<int>(static_cast<int64_t>(nA) * (part + 1) / parts), key, best, sim);
}

// dst and weight of one image.
template <typename Exec, typename metric_t>
TT_DEVICE void match_image(Exec& ex, const Step& s, const MatchImage<metric_t>& im,
                           void* shared) {
  const int N = s.N, D = s.D, K = s.K, P = s.P, RB = s.rows_per_chunk;
  const Layout l = layout(s);
  float* words = static_cast<float*>(shared);
  int* iwords = static_cast<int*>(shared);
  float* inv_norm = words + l.inv_norm;
  float* key = words + l.key;
  int* best = iwords + l.best;
  int* keep = iwords + l.keep;
  int* row_of = iwords + l.row_of;
  int* removed = iwords + l.removed;
  float* sim = words + l.sim;
  const float* size = im.size;
  const float* score = im.score;
  const float neg_inf = -INFINITY;

  // The metric, staged in shared memory when it fits; the cosine of a zero row is 0, as in the
  // reference (norms clamped at NORM_EPS).
  const metric_t* m = im.metric;
  int64_t sn = im.metric_sn;
  if (s.needs_affinity) {
    if (s.metric_ld > 0) {
      metric_t* staged = reinterpret_cast<metric_t*>(
          static_cast<unsigned char*>(shared) + (static_cast<int64_t>(l.words) * 4 + 15) / 16 * 16);
      ex.for_each(N * D, [&](int e) {
        const int t = e / D, d = e % D;
        staged[t * s.metric_ld + d] = m[t * sn + d];
      });
      m = staged;
      sn = s.metric_ld;
    }
    inverse_norms(ex, s, m, sn, inv_norm);
  }
  const Affinity<metric_t> affinity{s, m, sn, inv_norm, size};

  // Removal keys. By importance: the score. By redundancy: each A token's best affinity to a B
  // token (ToMe's bipartite split), and which B token that is: computed here, or by keys_image.
  const Bipartite ab(s);
  const int a0 = ab.a0, nA = ab.nA;
  ex.for_each(N, [&](int j) {
    key[j] = s.by_importance && j >= P ? score[j] : neg_inf;
    best[j] = 0;
  });
  if (!s.by_importance) {
    if (im.key_in) {
      ex.for_each(nA, [&](int i) {
        const int a = a0 + 2 * i;
        key[a] = im.key_in[a];
        best[a] = im.best_in[a];
      });
    } else {
      best_b_keys(ex, s, affinity, 0, nA, key, best, sim);
    }
    if (s.mix) {
      const float top_score = fmaxf(
          ex.max(N, [&](int j) { return j >= P ? score[j] : neg_inf; }, neg_inf), SCORE_EPS);
      ex.for_each(nA, [&](int i) {
        const int a = a0 + 2 * i;
        key[a] = key[a] * s.w_red + (1.f - score[a] / top_score) * s.w_imp;
      });
    }
  }

  // Who leaves: an exact rank among the members (descending key, lower index first on ties),
  // the same order as the reference's stable sort.
  const auto member = [&](int j) { return j >= P && (s.by_importance || j % 2 == 0); };
  ex.for_each(N, [&](int i) {
    if (!member(i)) {
      keep[i] = 1;
      return;
    }
    int rank = 0;
    for (int j = P; j < N; ++j)
      rank += member(j) && (key[j] > key[i] || (key[j] == key[i] && j < i));
    keep[i] = s.by_importance ? rank < s.n_keep : rank >= s.r;
  });
  // Output rows of the kept tokens, and the removed tokens in order.
  ex.for_each(N, [&](int j) {
    int before = 0;
    for (int t = 0; t < j; ++t) before += keep[t];
    row_of[j] = keep[j] ? before : before - 1;
    if (!keep[j]) removed[j - before] = j;
  });
  const int n_removed = N - ex.sum(N, [&](int j) { return keep[j]; });

  // dst and weight: kept tokens keep their own row; removed ones follow the construction.
  float mass = 0.f, score_mass = 0.f;  // evit: sum(size) and sum(score * size) of the fused
  if (s.method == Method::Evit) {
    mass = ex.sum(n_removed, [&](int i) { return size[removed[i]]; });
    score_mass = ex.sum(n_removed, [&](int i) { return score[removed[i]] * size[removed[i]]; });
  }
  ex.for_each(N, [&](int j) {
    int64_t* d = im.dst + static_cast<int64_t>(j) * K;
    float* w = im.weight + static_cast<int64_t>(j) * K;
    for (int slot = 0; slot < K; ++slot) d[slot] = 0, w[slot] = 0.f;
    if (keep[j]) {
      d[0] = row_of[j];
      w[0] = 1.f;
    } else if (s.method == Method::Evit) {
      d[0] = N - s.r - 1;
      w[0] = score[j] * mass / fmaxf(score_mass, SCORE_EPS);
    } else if (s.method == Method::Tome) {
      d[0] = row_of[best[j]];
      w[0] = 1.f;
    }
  });
  if (s.method == Method::Spread) {
    const auto allowed = [&](int t) {
      return t >= P && keep[t] && (!s.targets_b || t % 2 == 1);
    };
    float* cand_val = words + l.cand_val;
    int* cand_tok = iwords + l.cand_tok;
    for (int c0 = 0; c0 < n_removed; c0 += RB) {
      const int rows = std::min(RB, n_removed - c0);
      ex.for_each(rows * N, [&](int e) {
        const int t = e % N;
        if (allowed(t)) sim[e] = affinity(removed[c0 + e / N], t);
      });
      ex.for_each_warp(rows, [&](int i, int lane, int lanes, int) {
        // The k most similar allowed targets in order (descending affinity, lower index first
        // on ties): each round takes the best target after the previous one in that order.
        const float* row = sim + i * N;
        float* val = cand_val + i * K;
        int* tok = cand_tok + i * K;
        int found = 0;
        float prev_v = INFINITY;
        int prev_t = -1;
        for (; found < K; ++found) {
          float top = neg_inf;
          int arg = kNone;
          for (int t = P + lane; t < N; t += lanes) {
            const bool after = row[t] < prev_v || (row[t] == prev_v && t > prev_t);
            if (allowed(t) && after && row[t] > top) top = row[t], arg = t;
          }
          ex.warp_argmax(top, arg);
          if (arg == kNone) break;
          if (lane == 0) val[found] = top, tok[found] = arg;
          prev_v = top;
          prev_t = arg;
        }
        // softmax(affinity / tau) over the targets found, on lane 0 (which wrote them).
        if (found == 0 || lane > 0) return;  // none: pruned
        float peak = neg_inf, total = 0.f;
        for (int slot = 0; slot < found; ++slot) peak = fmaxf(peak, val[slot] / s.tau);
        for (int slot = 0; slot < found; ++slot)
          total += (val[slot] = expf(val[slot] / s.tau - peak));
        const int64_t j = removed[c0 + i];
        for (int slot = 0; slot < found; ++slot) {
          im.weight[j * K + slot] = val[slot] / total;
          im.dst[j * K + slot] = row_of[tok[slot]];
        }
      });
    }
  }
}

}  // namespace image
}  // namespace tt
