"""Reference apply: X' = T X, with T in the format of ``match.py`` (input token j sends share
``weight[b, j, k]`` of itself to output row ``dst[b, j, k]``). Accumulated in fp32, written in x's
dtype.
"""
import torch


def apply(x, size, dst, weight, n_out, mode="mean"):
    """X' = T X. Returns (x_out [B, n_out, C], size_out [B, n_out] fp32).

    mode="mean": each output row is the size-weighted mean of what it receives;
    mode="norm": that mean, rescaled to the size-weighted mean of its inputs' norms (averaging
                 shrinks vectors that point apart; this keeps the residual stream's scale);
    mode="sum":  the plain product T X (no sizes, no division).
    size_out = sum of weight * size in both modes; rows that receive nothing are zero.
    """
    B, N, C = x.shape
    K = dst.shape[-1]
    flat_dst = dst.reshape(B, N * K)
    mass = weight * size[:, :, None]
    size_out = size.new_zeros(B, n_out).scatter_add_(1, flat_dst, mass.reshape(B, N * K))
    coef = weight if mode == "sum" else mass
    # Unused slots contribute nothing, even next to a non-finite x (0 * inf would be NaN).
    contrib = torch.where(coef[..., None] != 0, x.float()[:, :, None, :] * coef[..., None], 0.0)
    out = x.new_zeros(B, n_out, C, dtype=torch.float32)
    out.scatter_add_(1, flat_dst[..., None].expand(B, N * K, C), contrib.reshape(B, N * K, C))
    if mode != "sum":
        out = torch.where(size_out[..., None] > 0, out / size_out[..., None], 0.0)
    if mode == "norm":
        norm_in = x.float().norm(dim=-1, keepdim=True)[:, :, None, :] * coef[..., None]
        norm = x.new_zeros(B, n_out, 1, dtype=torch.float32).scatter_add_(
            1, flat_dst[..., None], norm_in.reshape(B, N * K, 1))
        norm = torch.where(size_out[..., None] > 0, norm / size_out[..., None], 0.0)
        length = out.norm(dim=-1, keepdim=True)
        out = torch.where(length > 0, out * (norm / length), 0.0)
    return out.to(x.dtype), size_out
