"""Reference apply and untransform of a sparse token transformation T.

T is stored by input token ("ELL by column"): input token j sends share ``weight[b, j, k]`` of itself
to output row ``dst[b, j, k]``. Everything is accumulated in fp32 and written in the input's dtype.
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


def untransform(y, dst, weight):
    """The column-normalised transpose of T: x_full[j] = sum_k weight * y[dst] / sum_k weight.

    Pruned tokens (all weights zero) come back as zeros.
    """
    B, N, K = dst.shape
    C = y.shape[-1]
    gathered = y.float().gather(1, dst.reshape(B, N * K, 1).expand(B, N * K, C)).reshape(B, N, K, C)
    total = weight.sum(-1, keepdim=True)
    coef = torch.where(total > 0, weight / total, 0.0)
    return (gathered * coef[..., None]).sum(2).to(y.dtype)
