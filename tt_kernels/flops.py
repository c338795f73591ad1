"""Exact FLOPs of a ViT of any family patch() takes under a reduction schedule, and the schedule
that meets a budget.

Counts 2 x the multiply-accumulates of every matrix product (patch embedding, the attention's
projections, QK^T, AV, MLP, pooling and heads) and of the reduction's own similarity (rows x N x
the metric's width); norms, softmax and activations are left out, as fvcore, ToMe and
torch.utils.flop_counter.FlopCounterMode do. So FlopCounterMode on a patched model's forward
gives the same number (tt.transform's similarity counted by step_flops, registered in ops.py).
"""
import math
import numbers

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

from .families import family_of
from .ops import ops
from .rules import a_count, max_r


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


def step_flops(method, n, prefix, by_importance, metric_dim):
    """FLOPs of one reduction step's similarity on one image of n tokens."""
    return 2 * _similarity_rows(method, n, prefix, by_importance) * n * metric_dim


def _by_importance(method, alpha):
    return method in ("prune", "evit") or (method == "spread" and alpha == 1)


def _similarity(metric, r, method, alpha, prefix):
    """FlopCounterMode's count of an op's similarity (step_flops) from its metric's shape
    [B, N, width] or per head [B, H, N, width] (the head sum's additions are not counted, as
    norms are not) and its settings."""
    if metric is None or not r:
        return 0
    images, n, width = metric[0], metric[-2], metric[-1]
    return images * step_flops(method, n, prefix, _by_importance(method, alpha), width)


@register_flop_formula(ops.match)
def _match_flops(metric, score=None, size=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
                 targets="all", prefix=1, cost="cosine", *, out_shape=None, **kwargs):
    return _similarity(metric, r, method, alpha, prefix)


@register_flop_formula(ops.transform)
def _transform_flops(x, size, metric, score=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
                     targets="all", prefix=1, mode="mean", cost="cosine", *, out_shape=None,
                     **kwargs):
    return _similarity(metric, r, method, alpha, prefix)


# FlopCounterMode counts SDPA's CUDA kernels but not the CPU's flash kernel (torch 2.11 to 2.14):
# the same formula for it.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)


def vit_flops(model, n0, schedule, prefix=None, by_importance=False, method="spread",
              metric_dim=None):
    """FLOPs of one image through `model` (a model of a family patch() takes, or its Family)
    removing schedule[i] tokens in block i (between its attention and its MLP), with a metric
    `metric_dim` wide (default: one head's keys, as ToMe)."""
    family = family_of(model)
    prefix = family.prefix if prefix is None else prefix
    heads, head_dim = family.heads
    macs = family.embed_macs(n0 - prefix)
    flops = 0
    n = n0
    for block, (n, r) in zip(family.blocks,
                             step_sizes(n0, schedule, prefix, by_importance, method)):
        attention, mlp = family.block_macs(block)
        macs += n * attention + 2 * n * n * heads * head_dim + (n - r) * mlp
        if r:
            flops += step_flops(method, n, prefix, by_importance, metric_dim or head_dim)
        n -= r
    return 2 * (macs + family.tail_macs(n)) + flops


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
    model = family_of(model)  # once, not in every count
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
