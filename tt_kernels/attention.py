"""How proportional attention's size bias enters attention.

A token that stands for s patches is attended to as s copies of itself: every key's logit gets
+log(s) of its token, softmax(q k^T * scale + log s) v. The bias is the same for every head and
every query, so it can enter SDPA in three exact forms (setting `attention` of tt_kernels.patch):

"mask"    an additive float attn_mask [B, 1, 1, N] (broadcast, never [B, H, N, N]) in q's dtype.
          On CUDA any float mask takes SDPA off the flash kernel (onto the memory-efficient or
          cuDNN kernel); a half q with an fp32 mask is misread by cuDNN (pytorch#191612), so the mask
          always has q's dtype; there it is a view of a buffer padded to a multiple of 8 keys, the
          alignment the memory-efficient kernel needs to read it in place instead of copying it.
          The CPU's kernels read any layout: there the mask is one op on the sizes.
"column"  the bias as one more head dimension, which keeps SDPA on flash: q gets a column of
          1/scale, k a column of log(s), v a zero column, then zeros up to a multiple of 8 (what
          flash needs), and SDPA gets the original scale, so scale q'.k' = scale q.k + log s. The
          patched block runs timm's Attention itself for this (column_attention); modules it does
          not know (not timm's Attention, or fused_attn=False, whose eager path takes no scale)
          get the mask instead: column_supported() says which.
"cudnn"   the mask, on cuDNN's attention kernel (torch.nn.attention.sdpa_kernel); CUDA only.
"auto"    the mask on the CPU (whose flash kernel takes the mask itself); on CUDA the form of
          CUDA_AUTO for q's dtype (the column where the module allows it).

While every size is 1 (no token merged yet) there is no bias and every form runs the module
exactly as unpatched.
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .verify import U32, unit_roundoff

FORMS = ("auto", "mask", "column", "cudnn")

# "auto" on CUDA, by q's dtype: the mask (timm's own call) until a GPU run of
# bench/bench_attention.py has timed the forms per shape (scripts/gpu_check.sh, phase bench) and
# the fastest replaces it here. The column is the candidate in half precision: flash, which takes
# no bias, is SDPA's fastest kernel there, and the column costs it (Dh + 8) / Dh of its work (72 /
# 64 at the standard models' Dh) plus three copies of q, k, v; whether that beats the
# memory-efficient kernel with a mask is unmeasured. fp32 has no flash kernel on CUDA.
CUDA_AUTO = {torch.float16: "mask", torch.bfloat16: "mask", torch.float32: "mask"}

# Keys a bias buffer holds a multiple of, and head dims the column pads to: the alignment (in
# elements) of SDPA's memory-efficient bias and of its flash head dim.
ALIGN = 8


def check_form(form):
    if form not in FORMS:
        raise ValueError(f"`attention` must be one of {FORMS}, got {form!r}")


def _padded(n):
    return -(-n // ALIGN) * ALIGN


def size_bias(size, dtype):
    """size [B, N] -> the additive mask log(size) [B, 1, 1, N] in `dtype` (q's), rounded once;
    off the CPU a view of a [B, 1, 1, N padded to 8] buffer whose strides are all multiples of 8.
    None without sizes."""
    if size is None:
        return None
    B, N = size.shape
    if size.is_cpu:  # one op: at batch 1 each op between two GEMMs runs cold
        log = size.log()
        return (log if log.dtype == dtype else log.to(dtype)).view(B, 1, 1, N)
    bias = torch.zeros(B, 1, 1, _padded(N), dtype=dtype, device=size.device)
    bias[..., :N] = size.log()[:, None, None, :]  # one rounding, to q's dtype
    return bias[..., :N]


def size_columns(q, k, v, size):
    """q, k, v [B, H, N, Dh] and size [B, N] -> (q', k', v', scale): the same attention with the
    size bias as one more head dimension, padded with zeros to a multiple of 8, for
    SDPA(q', k', v', scale=scale)[..., :Dh]. scale is SDPA's own default for Dh (1 / sqrt(Dh))."""
    head_dim = q.shape[-1]
    width = _padded(head_dim + 1)
    scale = 1.0 / math.sqrt(head_dim)

    def widen(t, column):
        lead = t.shape[:-1]
        zeros = t.new_zeros(()).expand(*lead, width - head_dim - 1)
        return torch.cat([t, column.expand(*lead, 1), zeros], -1)

    log_size = size.log().to(k.dtype)[:, None, :, None]  # [B, 1, N, 1]: every head alike
    return (widen(q, q.new_full((), 1.0 / scale)), widen(k, log_size),
            widen(v, v.new_zeros(())), scale)


def column_supported(attn):
    """Whether column_attention reproduces `attn`'s forward: timm's own Attention on its fused
    SDPA path (subclasses may change the forward; the eager path scales q itself)."""
    from timm.models.vision_transformer import Attention

    return type(attn) is Attention and bool(attn.fused_attn)


def column_attention(attn, x, size):
    """timm's Attention.forward(x) with the size bias in the column form (attn must be
    column_supported). Its q_norm / k_norm modules are called, so the family captures q and k."""
    B, N, _ = x.shape
    gate = getattr(attn, "gate", None)  # older timm has no gate, norm or attn_dim
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v, scale = size_columns(q, k, v, size)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training
                                       else 0.0, scale=scale)[..., :attn.head_dim]
    x = x.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    x = getattr(attn, "norm", torch.nn.Identity())(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def _weights(q, k, size):
    """The exact attention weights softmax(q k^T / sqrt(Dh) + log size), in float64."""
    logits = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if size is not None:
        logits = logits + size.double().log()[:, None, None, :]
    return logits.softmax(-1)


def reference(q, k, v, size):
    """The spec, in float64: softmax(q k^T / sqrt(Dh) + log size) v for q, k, v [B, H, N, Dh]
    and size [B, N] (None: no bias)."""
    return _weights(q, k, size) @ v.double()


def error_bound(q, k, v, size):
    """How far each element of any form's output (q's dtype) may lie from reference(), from the
    arithmetic of a fused kernel, with u the dtype's unit roundoff and u32 fp32's:
    a logit is an fp32 sum of Dh (+1 for the column) products times the scale, (Dh + 3) u32 of
    scale sum_d |q_d k_d| + |log s|; the bias rounds to q's dtype (u |log s|) and so, in the
    column, does 1 / scale (another u |log s|). Logit errors of at most e move every softmax
    weight by at most 2 e of itself; exp and the N-term normaliser add (N + 4) u32, and a half
    kernel rounds the weights to its dtype (u). The output's N-term sum errs by N u32 and rounds
    once (u), all relative to sum_j p_j |v_j| with p the exact weights."""
    u, (N, head_dim) = unit_roundoff(q.dtype), q.shape[-2:]
    products = q.double().abs() @ k.double().abs().transpose(-2, -1) / math.sqrt(head_dim)
    log_size = float(size.double().log().abs().max()) if size is not None else 0.0
    e = (head_dim + 3) * U32 * (float(products.max()) + log_size) + 2 * u * log_size
    return (2 * e + (2 * N + 4) * U32 + 2 * u) * (_weights(q, k, size) @ v.double().abs())


def q_dtype(x):
    """The dtype of the q that qkv(x) makes: autocast's when it is on for x's device."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def resolve(form, x):
    """The form `attention=form` runs on input x: "auto" made concrete. Whether a module can
    take the column is attend's question (column_supported), not this one's."""
    if form == "auto":
        return CUDA_AUTO.get(q_dtype(x), "mask") if x.is_cuda else "mask"
    return form


def cudnn_kernel(x, forms="'auto', 'mask' or 'column'"):
    """SDPA restricted to cuDNN's kernel (attention='cudnn'); off CUDA a ValueError that names
    the `forms` that run there."""
    if not x.is_cuda:
        raise ValueError(f"attention='cudnn' is cuDNN's CUDA kernel: the model runs on "
                         f"{x.device.type}; use {forms}")
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def attend(attn, x, size, form="auto"):
    """attn(x) with proportional attention for tokens of `size` [B, N] (None: all 1), in the
    form `form` (one of FORMS; see the module's docstring)."""
    check_form(form)
    if size is None:
        return attn(x)
    form = resolve(form, x)
    if form == "column" and column_supported(attn):
        return column_attention(attn, x, size)
    bias = size_bias(size, q_dtype(x))
    if form != "cudnn":  # the mask, also where the module cannot take the column
        return attn(x, attn_mask=bias)
    with cudnn_kernel(x):
        return attn(x, attn_mask=bias)
