"""Triton construction of T: one program per image computes the cosine similarities on the fly
(tiles through tl.dot, never an N x N matrix in memory), chooses the removed tokens by rank
(a pairwise count, so ties go to the lower index exactly as in the reference's stable sorts),
numbers the kept tokens and writes dst/weight. Small per-image scratch vectors carry the results
between the phases; a barrier separates the phases.
"""
import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (fixes triton 3.6's interpreter under NumPy 2.4)
from .apply import build_rows

# Compile-time constants: Triton lets @jit code read a global only when it is a tl.constexpr (the
# interpreter reads any global, so only a compile catches a plain int here).
PRUNE, EVIT, TOME, TRANSFORM = (tl.constexpr(i) for i in range(4))
METHOD_IDS = {"prune": PRUNE.value, "evit": EVIT.value, "tome": TOME.value,
              "transform": TRANSFORM.value}


@triton.jit
def similarity_rows(metric_ptr, norm_ptr, rows, N, D, s_n, s_d, BM: tl.constexpr,
                    NP: tl.constexpr, DC: tl.constexpr):
    """Cosine similarity of the tokens `rows` [BM] with all NP columns, [BM, NP] fp32."""
    cols = tl.arange(0, NP)
    row_norm = tl.load(norm_ptr + rows, mask=rows < N, other=1.0)
    col_norm = tl.load(norm_ptr + cols, mask=cols < N, other=1.0)
    acc = tl.zeros((BM, NP), tl.float32)
    for d0 in range(0, D, DC):
        d = d0 + tl.arange(0, DC)
        a = tl.load(metric_ptr + rows[:, None] * s_n + d[None, :] * s_d,
                    mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0).to(tl.float32)
        bt = tl.load(metric_ptr + cols[None, :] * s_n + d[:, None] * s_d,
                     mask=(cols[None, :] < N) & (d[:, None] < D), other=0.0).to(tl.float32)
        acc += tl.dot(a / row_norm[:, None], bt / col_norm[None, :], input_precision="ieee")
    return acc


@triton.jit
def affinity_rows(metric_ptr, norm_ptr, size_ptr, rows, N, D, s_n, s_d, WARD: tl.constexpr,
                  BM: tl.constexpr, NP: tl.constexpr, DC: tl.constexpr):
    """Affinity of the tokens `rows` with all columns: the cosine, or minus Ward's merge cost
    size_i size_j / (size_i + size_j) (1 - cosine), as in the reference."""
    sim = similarity_rows(metric_ptr, norm_ptr, rows, N, D, s_n, s_d, BM, NP, DC)
    if WARD:
        cols = tl.arange(0, NP)
        s_i = tl.load(size_ptr + rows, mask=rows < N, other=1.0)
        s_j = tl.load(size_ptr + cols, mask=cols < N, other=1.0)
        pair = s_i[:, None] * s_j[None, :] / tl.maximum(s_i[:, None] + s_j[None, :], 1e-30)
        sim = -(pair * (1 - sim))
    return sim


@triton.jit
def rank_and_keep(key_ptr, keep_ptr, N, R, PREFIX, N_KEEP, BY_IMPORTANCE: tl.constexpr,
                  NP: tl.constexpr, BI: tl.constexpr):
    """Ranks the members by key (descending, lower index first on ties) and writes keep[NP].

    By importance the members are all unprotected tokens and the N_KEEP best stay; otherwise the
    members are ToMe's A tokens and the R best leave.
    """
    j = tl.arange(0, NP)
    key_j = tl.load(key_ptr + j)
    if BY_IMPORTANCE:
        member_j = (j >= PREFIX) & (j < N)
    else:
        member_j = (j >= PREFIX) & (j < N) & (j % 2 == 0)
    for i0 in range(0, NP, BI):
        i = i0 + tl.arange(0, BI)
        key_i = tl.load(key_ptr + i)
        ahead = (key_j[None, :] > key_i[:, None]) | (
            (key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
        rank = tl.sum((member_j[None, :] & ahead).to(tl.int32), axis=1)
        if BY_IMPORTANCE:
            keep = (i < N) & ((i < PREFIX) | (rank < N_KEEP))
        else:
            keep = (i < N) & ~((i >= PREFIX) & (i % 2 == 0) & (rank < R))
        tl.store(keep_ptr + i, keep.to(tl.int32))


@triton.jit
def match_kernel(metric_ptr, score_ptr, size_ptr, dst_ptr, weight_ptr,
                 norm_ptr, key_ptr, best_ptr, keep_ptr, rows_ptr, start_ptr, entry_ptr,
                 N, D, R, PREFIX, N_KEEP, W_RED, W_IMP, TAU, s_b, s_n, s_d,
                 METHOD: tl.constexpr, BY_IMPORTANCE: tl.constexpr, MIX: tl.constexpr,
                 TARGETS_B: tl.constexpr, WARD: tl.constexpr, K: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr,
                 DC: tl.constexpr, BUILD_ROWS: tl.constexpr, NKP: tl.constexpr,
                 ROWS_P: tl.constexpr):
    b = tl.program_id(0)
    if BUILD_ROWS:  # the fused step also lays out T by output row for the apply (apply.py)
        start_ptr += b * ROWS_P
        entry_ptr += b * NKP
    metric_ptr += b * s_b
    score_ptr += b * N
    size_ptr += b * N
    dst_ptr += b * N * K
    weight_ptr += b * N * K
    norm_ptr += b * NP
    key_ptr += b * NP
    best_ptr += b * NP
    keep_ptr += b * NP
    rows_ptr += b * NP
    cols = tl.arange(0, NP)
    valid = cols < N
    free = valid & (cols >= PREFIX)

    # Phase 0: norms (cosine of a zero vector is 0, as in the reference).
    if METHOD >= TOME:
        sq = tl.zeros((NP,), tl.float32)
        for d0 in range(0, D, DC):
            d = d0 + tl.arange(0, DC)
            v = tl.load(metric_ptr + cols[:, None] * s_n + d[None, :] * s_d,
                        mask=valid[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
            sq += tl.sum(v * v, axis=1)
        tl.store(norm_ptr + cols, tl.maximum(tl.sqrt(sq), 1e-12))
        tl.debug_barrier()

    # Phase 1: the removal key of every token.
    if BY_IMPORTANCE:
        key = tl.load(score_ptr + cols, mask=valid, other=0.0)
    else:
        # Redundancy: each A token's best affinity to a B token (and which one, for tome). Only
        # A tokens may leave, so only their rows are computed.
        is_b = free & (cols % 2 == 1)
        for i0 in range(0, N, 2 * BM):
            rows = PREFIX + PREFIX % 2 + i0 + 2 * tl.arange(0, BM)
            sim = affinity_rows(metric_ptr, norm_ptr, size_ptr, rows, N, D, s_n, s_d, WARD, BM,
                                NP, DC)
            sim = tl.where(is_b[None, :], sim, float("-inf"))
            tl.store(key_ptr + rows, tl.max(sim, axis=1), mask=rows < N)
            tl.store(best_ptr + rows, tl.argmax(sim, axis=1), mask=rows < N)
        tl.debug_barrier()
        key = tl.load(key_ptr + cols)
        if MIX:
            score = tl.load(score_ptr + cols, mask=valid, other=0.0)
            top = tl.maximum(tl.max(tl.where(free, score, float("-inf")), axis=0), 1e-30)
            key = key * W_RED + (1 - score / top) * W_IMP
    tl.store(key_ptr + cols, key)
    tl.debug_barrier()

    # Phase 2: who stays, and the output row of each kept token.
    rank_and_keep(key_ptr, keep_ptr, N, R, PREFIX, N_KEEP, BY_IMPORTANCE, NP, BM)
    tl.debug_barrier()
    keep_all = tl.load(keep_ptr + cols) != 0
    tl.store(rows_ptr + cols, tl.cumsum(keep_all.to(tl.int32), axis=0) - 1)
    tl.debug_barrier()
    if METHOD == EVIT:
        score_all = tl.load(score_ptr + cols, mask=valid, other=0.0)
        size_all = tl.load(size_ptr + cols, mask=valid, other=0.0)
        fused = valid & ~keep_all
        mass = tl.sum(tl.where(fused, size_all, 0.0), axis=0)
        score_mass = tl.maximum(tl.sum(tl.where(fused, score_all * size_all, 0.0), axis=0), 1e-30)

    # Phase 3: dst and weight, BM input tokens at a time.
    if METHOD == TRANSFORM:
        if BY_IMPORTANCE:
            first = 0
            step = 1
        else:
            # Only A tokens may leave: every other token keeps its own row, written here, and
            # only A rows need affinities below.
            first = PREFIX + PREFIX % 2
            step = 2
            for row0 in range(0, N, BM):
                rows = row0 + tl.arange(0, BM)
                in_range = rows < N
                own = tl.load(rows_ptr + rows, mask=in_range, other=0).to(tl.int64)
                for s in tl.static_range(K):
                    if s == 0:
                        tl.store(dst_ptr + rows * K, own, mask=in_range)
                        tl.store(weight_ptr + rows * K, tl.full((BM,), 1.0, tl.float32),
                                 mask=in_range)
                    else:
                        tl.store(dst_ptr + rows * K + s, tl.zeros((BM,), tl.int64), mask=in_range)
                        tl.store(weight_ptr + rows * K + s, tl.zeros((BM,), tl.float32),
                                 mask=in_range)
            tl.debug_barrier()
        allowed = free & keep_all
        if TARGETS_B:
            allowed = allowed & (cols % 2 == 1)
        for i0 in range(0, N, step * BM):
            rows = first + i0 + step * tl.arange(0, BM)
            in_range = rows < N
            kept = tl.load(keep_ptr + rows, mask=in_range, other=1) != 0
            own = tl.load(rows_ptr + rows, mask=in_range, other=0).to(tl.int64)
            out = dst_ptr + rows * K
            out_w = weight_ptr + rows * K
            cand = affinity_rows(metric_ptr, norm_ptr, size_ptr, rows, N, D, s_n, s_d, WARD, BM,
                                 NP, DC)
            cand = tl.where(allowed[None, :], cand, float("-inf"))
            peak = tl.max(cand, axis=1) / TAU
            total = tl.zeros((BM,), tl.float32)
            # The k best targets by repeated argmax (lowest index on ties); softmax(cos / tau).
            for s in tl.static_range(K):
                best = tl.max(cand, axis=1)
                pick = tl.argmax(cand, axis=1)
                used = best > float("-inf")
                e = tl.where(used, tl.exp(best / TAU - peak), 0.0)
                total += e
                target = tl.load(rows_ptr + pick, mask=used & in_range, other=0).to(tl.int64)
                if s == 0:  # a kept token's own row lives in slot 0
                    own_dst = own
                    own_w = 1.0
                else:
                    own_dst = 0
                    own_w = 0.0
                tl.store(out + s, tl.where(kept, own_dst, target), mask=in_range)
                tl.store(out_w + s, tl.where(kept, own_w, e), mask=in_range)
                cand = tl.where(cols[None, :] == pick[:, None], float("-inf"), cand)
            tl.debug_barrier()
            for s in tl.static_range(K):
                w = tl.load(out_w + s, mask=in_range, other=0.0)
                w = tl.where(kept, w, tl.where(total > 0, w / total, 0.0))
                tl.store(out_w + s, w, mask=in_range)
    else:
        for row0 in range(0, N, BM):
            rows = row0 + tl.arange(0, BM)
            in_range = rows < N
            kept = tl.load(keep_ptr + rows, mask=in_range, other=1) != 0
            own = tl.load(rows_ptr + rows, mask=in_range, other=0).to(tl.int64)
            if METHOD == PRUNE:
                dst = tl.where(kept, own, 0)
                w = tl.where(kept, 1.0, 0.0)
            elif METHOD == EVIT:
                s_row = tl.load(score_ptr + rows, mask=in_range, other=0.0)
                dst = tl.where(kept, own, N - R - 1)
                w = tl.where(kept, 1.0, s_row * mass / score_mass)
            else:
                partner = tl.load(best_ptr + rows, mask=in_range, other=0)
                dst = tl.where(kept, own, tl.load(rows_ptr + partner, mask=in_range, other=0))
                w = tl.full((BM,), 1.0, tl.float32)
            tl.store(dst_ptr + rows * K, dst.to(tl.int64), mask=in_range)
            tl.store(weight_ptr + rows * K, w, mask=in_range)

    if BUILD_ROWS:
        tl.debug_barrier()
        build_rows(dst_ptr, weight_ptr, start_ptr, entry_ptr, N * K, N - R, NKP, ROWS_P)


def pow2(n, least=16):
    return max(triton.next_power_of_2(max(n, 1)), least)


# One program holds an image's similarity tile [BM, NP] (NP = N rounded up to a power of 2) and
# stages its [DC, NP] fp32 operand in shared memory, NP * DC * 4 bytes per pipeline stage: at
# NP = 4096 a single stage takes 256 KB, above the 227 KB (232448 bytes) a block may use on an
# H100/H200. So N <= 2048; larger images need the CUDA or reference backend.
MAX_TOKENS = 2048
# (num_warps, num_stages) by NP, from sm_90 compiles of the heaviest variant (transform, k = 4,
# Ward, alpha mix, fp32 metric; triton 3.8): more warps shrink each thread's share of the [BM, NP]
# tiles, and a second stage stages the operand in shared memory rather than registers where it
# fits. With 4 warps and 3 stages NP = 512 spilled 208 bytes a thread, NP = 1024 1.3 KB, and
# NP = 2048 needed 387 KB of shared memory (2 stages: 258 KB). Chosen, shared / spills a thread:
# 256: 51 KB / 0; 512: 66 KB / 0; 1024: 130 KB / 72 B; 2048: 129 KB / 1.3 KB (16 warps: more).
_WARPS_STAGES = {256: (4, 3), 512: (8, 2), 1024: (8, 2), 2048: (8, 1)}


def match_config(N):
    """match_kernel's tiles and launch options for images of N tokens."""
    if N > MAX_TOKENS:
        raise ValueError(f"the Triton match kernel supports images of at most {MAX_TOKENS} tokens "
                         f"(its similarity tiles must fit in shared memory), got N = {N}; use "
                         "the CUDA or reference backend")
    NP = pow2(N)
    num_warps, num_stages = _WARPS_STAGES[max(NP, 256)]
    # tl.dot needs tiles of at least 16 x 16: BM rows against all NP columns, DC channels a step
    return dict(NP=NP, BM=16, DC=16, num_warps=num_warps, num_stages=num_stages)


def launch_match(metric, score, size, r, method, k, tau, alpha, targets, prefix, cost="cosine",
                 rows=None):
    """Runs match_kernel on checked inputs; `rows` = (start, entry) buffers to fill as well."""
    ref = metric if metric is not None else score
    B, N = ref.shape[:2]
    config = match_config(N)
    transform = method == "transform"
    K = k if transform else 1
    alpha = float(alpha) if transform else 0.0  # as the C++ checks: transform only
    by_importance = method in ("prune", "evit") or alpha == 1
    NP = config["NP"]
    dst = torch.empty(B, N, K, dtype=torch.long, device=ref.device)
    weight = torch.empty(B, N, K, dtype=torch.float32, device=ref.device)
    if B == 0 or N == 0:
        return dst, weight
    scratch = torch.zeros(5, B, NP, dtype=torch.float32, device=ref.device)
    norm, key = scratch[0], scratch[1]
    best, keep, out_rows = (scratch[i].view(torch.int32) for i in (2, 3, 4))
    if metric is None:
        metric = ref.new_zeros(B, N, 1)
    score = score.contiguous() if score is not None else weight  # unread without a score
    size = size.contiguous() if size is not None else torch.ones(B, N, device=ref.device)
    n_keep = N - r - prefix - (1 if method == "evit" and r > 0 else 0)
    start, entry = rows if rows is not None else (dst, dst)
    match_kernel[(B,)](
        metric, score, size, dst, weight, norm, key, best, keep, out_rows, start, entry,
        N, metric.shape[2], r, prefix, n_keep, float(1 - alpha), float(alpha), float(tau),
        metric.stride(0), metric.stride(1), metric.stride(2),
        METHOD=METHOD_IDS[method], BY_IMPORTANCE=by_importance, MIX=0 < alpha < 1,
        TARGETS_B=targets == "b", WARD=cost == "ward", K=K, BUILD_ROWS=rows is not None,
        NKP=entry.shape[-1] if rows is not None else 1,
        ROWS_P=start.shape[-1] if rows is not None else 1, **config)
    return dst, weight


def match(metric, score=None, size=None, r=0, method="transform", k=1, tau=0.1, alpha=0.0,
          targets="all", prefix=1, cost="cosine"):
    """tt.match on the Triton kernels."""
    torch.ops.tt.check_match(metric, score, size, r, method, k, tau, alpha, targets, prefix, cost)
    return launch_match(metric, score, size, r, method, k, tau, alpha, targets, prefix, cost)
