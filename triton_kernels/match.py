"""Triton construction of T: one program per image computes the cosine similarities on the fly
(tiles through tl.dot, never an N x N matrix in memory), chooses the removed tokens by rank
(a pairwise count, so ties go to the lower index exactly as in the reference's stable sorts),
numbers the kept tokens and writes dst/weight. Small per-image scratch vectors carry the results
between the phases; a barrier separates the phases.

Rows of affinities are reduced over BN-wide column tiles with a running result (the best B token,
the k best targets, a rank count), so no tile spans all N columns: each affinity is the same fp32
sum over the same DC-wide chunks as in one pass, and the running merge keeps one pass's order.
"""
import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (fixes triton 3.6's interpreter under NumPy 2.4)
from .apply import build_rows
from ..rules import NORM_EPS as _NORM_EPS, SCORE_EPS as _SCORE_EPS, n_keep

# Compile-time constants: Triton lets @jit code read a global only when it is a tl.constexpr (the
# interpreter reads any global, so only a compile catches a plain int here).
PRUNE, EVIT, TOME, SPREAD = (tl.constexpr(i) for i in range(4))
METHOD_IDS = {"prune": PRUNE.value, "evit": EVIT.value, "tome": TOME.value,
              "spread": SPREAD.value}
NORM_EPS, SCORE_EPS = tl.constexpr(_NORM_EPS), tl.constexpr(_SCORE_EPS)


@triton.jit
def similarity_tile(metric_ptr, norm_ptr, rows, cols, N, D, s_n, s_d, BM: tl.constexpr,
                    BN: tl.constexpr, DC: tl.constexpr):
    """Cosine similarity of the tokens `rows` [BM] with the tokens `cols` [BN], [BM, BN] fp32.

    Each value is the same sum over the same DC-wide chunks whatever the tile: tiling the columns
    changes no affinity."""
    row_norm = tl.load(norm_ptr + rows, mask=rows < N, other=1.0)
    col_norm = tl.load(norm_ptr + cols, mask=cols < N, other=1.0)
    acc = tl.zeros((BM, BN), tl.float32)
    for d0 in range(0, D, DC):
        d = d0 + tl.arange(0, DC)
        a = tl.load(metric_ptr + rows[:, None] * s_n + d[None, :] * s_d,
                    mask=(rows[:, None] < N) & (d[None, :] < D), other=0.0).to(tl.float32)
        bt = tl.load(metric_ptr + cols[None, :] * s_n + d[:, None] * s_d,
                     mask=(cols[None, :] < N) & (d[:, None] < D), other=0.0).to(tl.float32)
        acc += tl.dot(a / row_norm[:, None], bt / col_norm[None, :], input_precision="ieee")
    return acc


@triton.jit
def affinity_tile(metric_ptr, norm_ptr, size_ptr, rows, cols, N, D, s_n, s_d,
                  WARD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DC: tl.constexpr):
    """Affinity of the tokens `rows` with the tokens `cols`: the cosine, or minus Ward's merge
    cost size_i size_j / (size_i + size_j) (1 - cosine), as in the reference."""
    sim = similarity_tile(metric_ptr, norm_ptr, rows, cols, N, D, s_n, s_d, BM, BN, DC)
    if WARD:
        s_i = tl.load(size_ptr + rows, mask=rows < N, other=1.0)
        s_j = tl.load(size_ptr + cols, mask=cols < N, other=1.0)
        pair = s_i[:, None] * s_j[None, :] / tl.maximum(s_i[:, None] + s_j[None, :], SCORE_EPS)
        sim = -(pair * (1 - sim))
    return sim


@triton.jit
def merge_best(best_v, best_i, cand, c0, K: tl.constexpr, BM: tl.constexpr, KP: tl.constexpr,
               BN: tl.constexpr):
    """Each row's K best of a running list and the next column tile, by value (descending), then
    index (ascending): the first K of the reference's stable descending sort.

    best_v, best_i [BM, KP]: the list so far, in that order (-inf where empty), from columns
    before c0; cand [BM, BN]: the values of the columns c0 + [0, BN). Each step takes the larger
    head, the list's on a tie (its index is lower), and within a tile tl.argmax takes the lowest
    column on a tie, so the merge keeps the order of one pass over all the columns.
    """
    slot = tl.arange(0, KP)
    col = tl.arange(0, BN)
    new_v = tl.full((BM, KP), float("-inf"), tl.float32)
    new_i = tl.zeros((BM, KP), tl.int32)
    for s in tl.static_range(K):
        head_v = tl.max(best_v, axis=1)
        head_s = tl.argmax(best_v, axis=1)
        head_i = tl.sum(tl.where(slot[None, :] == head_s[:, None], best_i, 0), axis=1)
        tile_v = tl.max(cand, axis=1)
        tile_c = tl.argmax(cand, axis=1)
        from_tile = tile_v > head_v
        new_v = tl.where(slot[None, :] == s, tl.where(from_tile, tile_v, head_v)[:, None], new_v)
        new_i = tl.where(slot[None, :] == s,
                         tl.where(from_tile, c0 + tile_c, head_i)[:, None], new_i)
        best_v = tl.where(~from_tile[:, None] & (slot[None, :] == head_s[:, None]),
                          float("-inf"), best_v)
        cand = tl.where(from_tile[:, None] & (col[None, :] == tile_c[:, None]), float("-inf"),
                        cand)
    return new_v, new_i


@triton.jit
def rank_and_keep(key_ptr, keep_ptr, N, R, PREFIX, N_KEEP, BY_IMPORTANCE: tl.constexpr,
                  BI: tl.constexpr, BN: tl.constexpr):
    """Ranks the members by key (descending, lower index first on ties) and writes keep[N].

    By importance the members are all unprotected tokens and the N_KEEP best stay; otherwise the
    members are ToMe's A tokens and the R best leave. A rank is a count, summed over BN-wide
    tiles of the members.
    """
    for i0 in range(0, N, BI):
        i = i0 + tl.arange(0, BI)
        key_i = tl.load(key_ptr + i)
        rank = tl.zeros((BI,), tl.int32)
        for j0 in range(0, N, BN):
            j = j0 + tl.arange(0, BN)
            key_j = tl.load(key_ptr + j)
            if BY_IMPORTANCE:
                member_j = (j >= PREFIX) & (j < N)
            else:
                member_j = (j >= PREFIX) & (j < N) & (j % 2 == 0)
            ahead = (key_j[None, :] > key_i[:, None]) | (
                (key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((member_j[None, :] & ahead).to(tl.int32), axis=1)
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
                 TARGETS_B: tl.constexpr, WARD: tl.constexpr, K: tl.constexpr,
                 KP: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
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
    # Every loop over columns below runs over BN-wide tiles (the scratch vectors hold NP >= N
    # entries, so a tile's tail stays inside them), carrying its reduction from tile to tile.

    # Phase 0: norms (cosine of a zero vector is 0, as in the reference).
    if METHOD >= TOME:
        for c0 in range(0, N, BN):
            cols = c0 + tl.arange(0, BN)
            sq = tl.zeros((BN,), tl.float32)
            for d0 in range(0, D, DC):
                d = d0 + tl.arange(0, DC)
                v = tl.load(metric_ptr + cols[:, None] * s_n + d[None, :] * s_d,
                            mask=(cols[:, None] < N) & (d[None, :] < D), other=0.0).to(tl.float32)
                sq += tl.sum(v * v, axis=1)
            tl.store(norm_ptr + cols, tl.maximum(tl.sqrt(sq), NORM_EPS))
        tl.debug_barrier()

    # Phase 1: the removal key of every token.
    if BY_IMPORTANCE:
        for c0 in range(0, N, BN):
            cols = c0 + tl.arange(0, BN)
            tl.store(key_ptr + cols, tl.load(score_ptr + cols, mask=cols < N, other=0.0))
    else:
        # Redundancy: each A token's best affinity to a B token (and which one, for tome). Only
        # A tokens may leave, so only their rows are computed.
        for i0 in range(0, N, 2 * BM):
            rows = PREFIX + PREFIX % 2 + i0 + 2 * tl.arange(0, BM)
            best_v = tl.full((BM, 1), float("-inf"), tl.float32)
            best_i = tl.zeros((BM, 1), tl.int32)
            for c0 in range(0, N, BN):
                cols = c0 + tl.arange(0, BN)
                is_b = (cols < N) & (cols >= PREFIX) & (cols % 2 == 1)
                sim = affinity_tile(metric_ptr, norm_ptr, size_ptr, rows, cols, N, D, s_n, s_d,
                                    WARD, BM, BN, DC)
                sim = tl.where(is_b[None, :], sim, float("-inf"))
                best_v, best_i = merge_best(best_v, best_i, sim, c0, 1, BM, 1, BN)
            tl.store(key_ptr + rows, tl.max(best_v, axis=1), mask=rows < N)
            tl.store(best_ptr + rows, tl.max(best_i, axis=1), mask=rows < N)
        if MIX:
            top = float("-inf")
            for c0 in range(0, N, BN):
                cols = c0 + tl.arange(0, BN)
                score = tl.load(score_ptr + cols, mask=cols < N, other=0.0)
                free = (cols < N) & (cols >= PREFIX)
                top = tl.maximum(top, tl.max(tl.where(free, score, float("-inf")), axis=0))
            top = tl.maximum(top, SCORE_EPS)
            tl.debug_barrier()
            for c0 in range(0, N, BN):
                cols = c0 + tl.arange(0, BN)
                score = tl.load(score_ptr + cols, mask=cols < N, other=0.0)
                key = tl.load(key_ptr + cols)
                tl.store(key_ptr + cols, key * W_RED + (1 - score / top) * W_IMP)
    tl.debug_barrier()

    # Phase 2: who stays, and the output row of each kept token (a running count of the kept).
    rank_and_keep(key_ptr, keep_ptr, N, R, PREFIX, N_KEEP, BY_IMPORTANCE, BM, BN)
    tl.debug_barrier()
    kept_before = 0
    for c0 in range(0, N, BN):
        cols = c0 + tl.arange(0, BN)
        kept = tl.load(keep_ptr + cols, mask=cols < N, other=0)
        tl.store(rows_ptr + cols, kept_before + tl.cumsum(kept, axis=0) - 1)
        kept_before += tl.sum(kept, axis=0)
    tl.debug_barrier()
    if METHOD == EVIT:
        # Two sums over all tokens, in one [NP] vector each (no tile of affinities here).
        cols = tl.arange(0, NP)
        valid = cols < N
        score_all = tl.load(score_ptr + cols, mask=valid, other=0.0)
        size_all = tl.load(size_ptr + cols, mask=valid, other=0.0)
        fused = valid & (tl.load(keep_ptr + cols) == 0)
        mass = tl.sum(tl.where(fused, size_all, 0.0), axis=0)
        score_mass = tl.maximum(tl.sum(tl.where(fused, score_all * size_all, 0.0), axis=0), SCORE_EPS)

    # Phase 3: dst and weight, BM input tokens at a time.
    if METHOD == SPREAD:
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
        slot = tl.arange(0, KP)
        for i0 in range(0, N, step * BM):
            rows = first + i0 + step * tl.arange(0, BM)
            in_range = rows < N
            kept = tl.load(keep_ptr + rows, mask=in_range, other=1) != 0
            own = tl.load(rows_ptr + rows, mask=in_range, other=0).to(tl.int64)
            out = dst_ptr + rows * K
            out_w = weight_ptr + rows * K
            # The k best targets (lowest index on ties), merged tile by tile.
            best_v = tl.full((BM, KP), float("-inf"), tl.float32)
            best_i = tl.zeros((BM, KP), tl.int32)
            for c0 in range(0, N, BN):
                cols = c0 + tl.arange(0, BN)
                allowed = ((cols < N) & (cols >= PREFIX)
                           & (tl.load(keep_ptr + cols, mask=cols < N, other=0) != 0))
                if TARGETS_B:
                    allowed = allowed & (cols % 2 == 1)
                cand = affinity_tile(metric_ptr, norm_ptr, size_ptr, rows, cols, N, D, s_n, s_d,
                                     WARD, BM, BN, DC)
                cand = tl.where(allowed[None, :], cand, float("-inf"))
                best_v, best_i = merge_best(best_v, best_i, cand, c0, K, BM, KP, BN)
            peak = tl.max(best_v, axis=1) / TAU
            total = tl.zeros((BM,), tl.float32)
            # softmax(cos / tau) over the k best
            for s in tl.static_range(K):
                best = tl.max(tl.where(slot[None, :] == s, best_v, float("-inf")), axis=1)
                pick = tl.sum(tl.where(slot[None, :] == s, best_i, 0), axis=1)
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


# Every phase walks the columns in BN-wide tiles, so a thread's share of the affinity tiles
# [BM, BN] and the tl.dot operand staged in shared memory ([DC, BN] fp32, 8 KB a pipeline stage)
# no longer grow with N. What still grows is the fused layout of T by output row
# (apply.build_rows): one sort of N * k entries in the program. sm_90 compiles, 8 warps and 2
# stages, of the patch's default step (k = 1, bf16) and the heaviest (transform, k = 4, Ward,
# alpha mix, fp32 metric), fused rows: up to N = 2048 at most 33 KB of shared memory and no spills
# (128-187 registers a thread, 255 for the heaviest on triton 3.6); 4 warps spill 16 bytes a
# thread already at N = 197 (k = 4 keeps 4 running best a row). At N = 4096 triton 3.8 still does
# not spill, but triton 3.6's sort of 4096-16384 entries spills 0.4-1.1 KB a thread (16 warps:
# more), so larger images need the CUDA or reference backend.
MAX_TOKENS = 2048
COLUMN_TILE = 128


def match_config(N):
    """match_kernel's tiles and launch options for images of N tokens."""
    if N > MAX_TOKENS:
        raise ValueError(f"the Triton match kernel supports images of at most {MAX_TOKENS} tokens "
                         "(its layout of T by output row sorts N * k entries in one program), "
                         f"got N = {N}; use the CUDA or reference backend")
    NP = pow2(N)
    # tl.dot needs tiles of at least 16 x 16: BM rows against BN columns, DC channels a step
    return dict(NP=NP, BM=16, BN=min(NP, COLUMN_TILE), DC=16, num_warps=8, num_stages=2)


def launch_match(metric, score, size, r, method, k, tau, alpha, targets, prefix, cost="cosine",
                 rows=None):
    """Runs match_kernel on checked inputs; `rows` = (start, entry) buffers to fill as well."""
    if metric is not None and metric.dim() == 4:  # per head: compared by the sum over heads
        metric = metric.sum(1, dtype=torch.float32)
    ref = metric if metric is not None else score
    B, N = ref.shape[:2]
    config = match_config(N)
    transform = method == "spread"
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
    start, entry = rows if rows is not None else (dst, dst)
    match_kernel[(B,)](
        metric, score, size, dst, weight, norm, key, best, keep, out_rows, start, entry,
        N, metric.shape[2], r, prefix, n_keep(method, N, r, prefix), float(1 - alpha), float(alpha), float(tau),
        metric.stride(0), metric.stride(1), metric.stride(2),
        METHOD=METHOD_IDS[method], BY_IMPORTANCE=by_importance, MIX=0 < alpha < 1,
        TARGETS_B=targets == "b", WARD=cost == "ward", K=K, KP=pow2(K, least=1),
        BUILD_ROWS=rows is not None,
        NKP=entry.shape[-1] if rows is not None else 1,
        ROWS_P=start.shape[-1] if rows is not None else 1, **config)
    return dst, weight


def match(metric, score=None, size=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
          targets="all", prefix=1, cost="cosine"):
    """tt.match on the Triton kernels."""
    torch.ops.tt.check_match(metric, score, size, r, method, k, tau, alpha, targets, prefix, cost)
    return launch_match(metric, score, size, r, method, k, tau, alpha, targets, prefix, cost)
