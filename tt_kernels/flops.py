"""Exact FLOPs of a timm ViT under a reduction schedule, and the schedule that meets a budget.

Counts 2 x the multiply-accumulates of every matrix product (patch embedding, qkv, QK^T, AV,
projection, MLP, head) and of the reduction's own similarity (rows x N x the metric's width);
norms, softmax and activations are left out, as fvcore and ToMe do.
"""
import math
import numbers

from .rules import a_count, max_r


def _linear(layer):
    return layer.in_features * layer.out_features


def _similarity_rows(method, n, prefix, by_importance):
    """Rows of the similarity a step computes: none for prune and evit (they use the score), all
    tokens when any may leave, else ToMe's A tokens only."""
    if method in ("prune", "evit"):
        return 0
    if by_importance:
        return n
    return a_count(n, prefix)


def step_sizes(n0, schedule, prefix=1, by_importance=False, method="spread"):
    """Token counts entering each block and the r actually removed after its attention; r is
    capped at what the construction allows for the tokens at hand."""
    n, sizes = n0, []
    for r in schedule:
        r = min(r, max_r(method, n, prefix, by_importance))
        sizes.append((n, r))
        n -= r
    return sizes


def vit_flops(model, n0, schedule, prefix=None, by_importance=False, method="spread",
              metric_dim=None):
    """FLOPs of one image through `model` (timm VisionTransformer) removing schedule[i] tokens in
    block i (between its attention and its MLP), with a metric `metric_dim` wide (default: one
    head's keys, as ToMe)."""
    prefix = model.num_prefix_tokens if prefix is None else prefix
    pe = model.patch_embed.proj
    patches = n0 - prefix
    macs = patches * pe.out_channels * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1]
    for block, (n, r) in zip(model.blocks, step_sizes(n0, schedule, prefix, by_importance, method)):
        attn = block.attn
        macs += n * (_linear(attn.qkv) + _linear(attn.proj))
        macs += 2 * n * n * attn.num_heads * attn.head_dim
        if r:
            macs += _similarity_rows(method, n, prefix, by_importance) * n * (
                metric_dim or attn.head_dim)
        m = n - r
        macs += m * (_linear(block.mlp.fc1) + _linear(block.mlp.fc2))
    if hasattr(model.head, "in_features"):
        macs += _linear(model.head)
    return 2 * macs


def check_fraction(fraction):
    """A FLOPs budget is a fraction of the unreduced model's FLOPs: a finite number in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or \
            not 0 < fraction <= 1:
        raise ValueError("`flops` must be a number in (0, 1] (a fraction of the unreduced "
                         f"FLOPs), got {fraction!r}")


def schedule_for_budget(model, n0, fraction, prefix=None, by_importance=False,
                        method="spread", metric_dim=None):
    """The schedule whose FLOPs come closest to `fraction` of the unreduced model's from below:
    the smallest constant r in every block but the last (whose removals would save only its own
    MLP), then one token less in the latest blocks while the budget still holds. A fraction that
    no constant r meets raises ValueError naming the lowest fraction that can be met."""
    check_fraction(fraction)
    depth = len(model.blocks)
    full = vit_flops(model, n0, [0] * depth, prefix)
    budget = fraction * full

    def flops(schedule):
        return vit_flops(model, n0, schedule, prefix, by_importance, method, metric_dim)

    reducing = [1] * (depth - 1) + [0] if depth > 1 else [1]
    # up to r = n0, where every block's cap binds: the most the construction can remove
    starts = [[r * b for b in reducing] for r in range(n0 + 1)]
    schedule = next((s for s in starts if flops(s) <= budget), None)
    if schedule is None:
        lowest = min(flops(s) for s in starts) / full
        # rounded up, so that the fraction in the message is itself a budget that can be met
        raise ValueError(f"`flops` must be at least {math.ceil(lowest * 1e4) / 1e4}, the lowest "
                         f"fraction this model reaches with {n0} tokens and method {method!r} "
                         "(every block but the last removing as many tokens as the construction "
                         f"allows), got {fraction!r}")
    for i in reversed(range(depth)):
        if schedule[i] > 0:
            trial = schedule[:i] + [schedule[i] - 1] + schedule[i + 1:]
            if flops(trial) <= budget:
                schedule = trial
    return schedule
