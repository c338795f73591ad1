"""Reference cls_attention: the importance score, the class token's attention with the proportional
bias."""
import torch


def cls_attention(q, k, size=None, scale=None):
    """score[b, j] = mean over heads of softmax_j(q[b, h, 0] . k[b, h, j] * scale + log size[b, j]).

    q, k: [B, H, N, Dh]; only the class query (index 0) is used, so no N x N matrix is formed.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * scale
    if size is not None:
        logits = logits + size.log()[:, None, :]
    return logits.softmax(-1).mean(1)
