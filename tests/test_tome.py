"""method="tome" reproduces ToMe (bipartite soft matching with a class token, then merge_wavg).

The oracle below is a plain per-image implementation written from the algorithm's description;
only the output order differs (ToMe: unmerged A tokens, then B; ours: ascending index), so outputs
are compared token by token through their original index.
"""
import pytest
import timm
import torch

import tt_kernels
from conftest import sum_tol, x_tol


def published_tome(x, size, metric, r, class_token=True, distill_token=False):
    """One image. Returns {original index: (merged x, merged size)} for the surviving tokens."""
    n = x.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    best = []
    for a in a_idx:
        sims = [float(m[a] @ m[b]) for b in b_idx]
        if class_token and a == 0:
            sims = [float("-inf")] * len(b_idx)
        if distill_token:
            sims[0] = float("-inf")  # nothing merges into the distillation token (index 1)
        j = max(range(len(sims)), key=lambda i: sims[i])
        best.append((sims[j], a, b_idx[j]))
    protected = int(class_token) + int(distill_token)
    r = min(r, (n - protected) // 2)
    merged = sorted(best, key=lambda t: -t[0])[:r]
    acc = {b: [x[b] * size[b], size[b].clone()] for b in b_idx}
    for _, a, b in merged:
        acc[b][0] = acc[b][0] + x[a] * size[a]
        acc[b][1] = acc[b][1] + size[a]
    out = {a: (x[a], size[a]) for _, a, _ in best if a not in {m_a for _, m_a, _ in merged}}
    out.update({b: (v / s, s) for b, (v, s) in acc.items()})
    return out


@pytest.fixture(scope="module")
def vit_tokens():
    """Intermediate tokens and attention keys of a (random-init) timm DeiT on a textured image."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    image = torch.stack([torch.sin(5 * xx) * yy, (xx * xx + yy * yy < 0.5).float() - 0.5, xx * yy])
    image = (image + 0.1 * torch.randn(2, 3, 224, 224)).float()
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(image))
        for block in model.blocks[:3]:
            x = block(x)
        attn = model.blocks[3].attn
        B, N, C = x.shape
        qkv = attn.qkv(model.blocks[3].norm1(x)).reshape(B, N, 3, attn.num_heads, -1)
        per_head = qkv[:, :, 1].transpose(1, 2)  # [B, H, N, Dh], as the attention holds them
    return x, per_head


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("r", [1, 13, 98])
@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("metric", ["mean", "per_head"])
def test_tome_equals_published_algorithm(vit_tokens, backend, r, prefix, metric):
    """ToMe's metric is the keys' mean over heads: given as such, or per head (the op then
    compares the tokens by the keys' sum over heads, which has the mean's cosines)."""
    x, per_head = vit_tokens
    keys = per_head.mean(1)
    size = torch.rand(x.shape[:2]) + 1  # after earlier merges sizes differ
    if prefix == 2:
        r = min(r, (x.shape[1] - 2) // 2)
    x_out, size_out, T = tt_kernels.transform(x, keys if metric == "mean" else per_head, r,
                                              size=size, method="tome", prefix=prefix,
                                              backend=backend)
    assert x_out.shape == (x.shape[0], x.shape[1] - r, x.shape[2])
    for b in range(x.shape[0]):
        expected = published_tome(x[b], size[b], keys[b], r, distill_token=prefix == 2)
        survivors = sorted(expected)  # our output order: ascending original index
        assert len(survivors) == x_out.shape[1]
        torch.testing.assert_close(size_out[b], torch.stack([expected[i][1] for i in survivors]),
                                   **sum_tol(x.shape[1]))
        # both sum the same size-weighted tokens in fp32, in other orders
        torch.testing.assert_close(x_out[b], torch.stack([expected[i][0] for i in survivors]),
                                   **x_tol(torch.float32, terms=x.shape[1], channels=0,
                                           magnitude=float(x.abs().max())))
