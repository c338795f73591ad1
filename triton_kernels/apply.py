"""Triton apply, X' = T X, in the deterministic gather form.

rows_kernel (one program per image) turns T, stored by input token, into per-output-row lists: a
sort of (row, entry) keys groups the entries by row in ascending input order, a histogram gives
each row's start. gather_kernel (one program per output row and channel block) then sums its
contributions in that order in fp32 -- no atomics, so results never depend on scheduling.
"""
import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (fixes triton 3.6's interpreter under NumPy 2.4)


@triton.jit
def build_rows(dst_ptr, weight_ptr, start_ptr, entry_ptr, NK, N_OUT, NKP: tl.constexpr,
               ROWS_P: tl.constexpr):
    """For one image: entry[NKP] = flat (j * K + k) indices grouped by row; start[ROWS_P]."""
    e = tl.arange(0, NKP)
    valid = e < NK
    d = tl.load(dst_ptr + e, mask=valid, other=0)
    w = tl.load(weight_ptr + e, mask=valid, other=0.0)
    row = tl.where(valid & (w != 0), d, N_OUT).to(tl.int32)  # unused slots sort last
    order = tl.sort(row * NKP + e)
    tl.store(entry_ptr + e, order % NKP)
    counts = tl.histogram(row, ROWS_P)
    tl.store(start_ptr + tl.arange(0, ROWS_P), tl.cumsum(counts, axis=0) - counts)


@triton.jit
def rows_kernel(dst_ptr, weight_ptr, start_ptr, entry_ptr, NK, N_OUT, NKP: tl.constexpr,
                ROWS_P: tl.constexpr):
    b = tl.program_id(0)
    build_rows(dst_ptr + b * NK, weight_ptr + b * NK, start_ptr + b * ROWS_P, entry_ptr + b * NKP,
               NK, N_OUT, NKP, ROWS_P)


# Compile-time constants, as match.py's methods.
SUM, MEAN, NORM = (tl.constexpr(i) for i in range(3))
MODES = {"sum": SUM.value, "mean": MEAN.value, "norm": NORM.value}


@triton.jit
def gather_kernel(x_ptr, size_ptr, weight_ptr, start_ptr, entry_ptr, norms_ptr, out_ptr,
                  size_out_ptr, N, K, C, N_OUT, s_xb, s_xn, s_xc, MODE: tl.constexpr,
                  NKP: tl.constexpr, ROWS_P: tl.constexpr, BC: tl.constexpr):
    row = tl.program_id(0)
    cblock = tl.program_id(1)
    b = row // N_OUT
    i = row % N_OUT
    begin = tl.load(start_ptr + b * ROWS_P + i)
    end = tl.load(start_ptr + b * ROWS_P + i + 1)
    c = cblock * BC + tl.arange(0, BC)
    acc = tl.zeros((BC,), tl.float32)
    total = 0.0
    norm = 0.0  # mode norm: the size-weighted sum of the inputs' norms (one block spans C)
    for a in range(begin, end):
        e = tl.load(entry_ptr + b * NKP + a)
        j = e // K
        w = tl.load(weight_ptr + b * N * K + e)
        mass = w * tl.load(size_ptr + b * N + j)
        total += mass
        xj = tl.load(x_ptr + b * s_xb + j * s_xn + c * s_xc, mask=c < C, other=0.0).to(tl.float32)
        if MODE == SUM:
            acc += w * xj
        else:
            acc += mass * xj
        if MODE == NORM:
            norm += mass * tl.load(norms_ptr + b * N + j)
    if MODE != SUM:
        acc = tl.where(total > 0, acc / total, 0.0)
    if MODE == NORM:
        length = tl.sqrt(tl.sum(acc * acc, axis=0))
        acc = acc * tl.where((length > 0) & (total > 0), (norm / total) / length, 0.0)
    tl.store(out_ptr + row * C + c, acc.to(out_ptr.dtype.element_ty), mask=c < C)
    if cblock == 0:
        tl.store(size_out_ptr + row, total)

def row_buffers(B, N, K, n_out, device):
    """(start, entry) buffers for build_rows: one extra row collects the unused slots."""
    nkp = triton.next_power_of_2(max(N * K, 1))
    rows_p = triton.next_power_of_2(n_out + 2)
    return (torch.empty(B, rows_p, dtype=torch.int32, device=device),
            torch.empty(B, nkp, dtype=torch.int32, device=device))


def launch_gather(x, size, weight, start, entry, n_out, mode):
    B, N, C = x.shape
    K = weight.shape[-1]
    out = x.new_empty(B, n_out, C)
    size_out = size.new_empty(B, n_out)
    if out.numel() == 0 and size_out.numel() == 0:
        return out, size_out
    # mode norm needs a whole row in one program; its input norms come precomputed
    BC = triton.next_power_of_2(max(C, 1))
    BC = BC if mode == "norm" else min(BC, 256)
    norms = x.float().norm(dim=-1).contiguous() if mode == "norm" else size
    gather_kernel[(B * n_out, max(triton.cdiv(C, BC), 1))](
        x, size, weight, start, entry, norms, out, size_out, N, K, C, n_out,
        x.stride(0), x.stride(1), x.stride(2),
        MODE=MODES[mode], NKP=entry.shape[-1], ROWS_P=start.shape[-1], BC=BC)
    return out, size_out


def apply(x, size, dst, weight, n_out, mode="mean"):
    """tt.apply on the Triton kernels."""
    torch.ops.tt.check_apply(x, size, dst, weight, n_out, mode)
    B, N, K = dst.shape
    size, dst, weight = size.contiguous(), dst.contiguous(), weight.contiguous()
    start, entry = row_buffers(B, N, K, n_out, x.device)
    if B > 0:
        rows_kernel[(B,)](dst, weight, start, entry, N * K, n_out, NKP=entry.shape[-1],
                          ROWS_P=start.shape[-1])
    return launch_gather(x, size, weight, start, entry, n_out, mode)
