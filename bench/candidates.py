"""Many-to-many constructions under study, in PyTorch, for bench/sweep_fidelity.py: each builds T in
the package's format (dst, weight by input token, tt_kernels.reference.match) and runs inside a
model patched with the default settings, in place of tt.transform's construction; T is applied by
the same tt.apply, so only the construction differs. None has a kernel: one that wins on the tuning
photos earns one.

Every candidate removes the tokens the default removes (the r A tokens with the best Ward affinity
to a B token, on the queries of all heads), except `prune_then_merge` and `greedy_pairs`, which
change who leaves; they differ in where a removed token goes (kept tokens after the prefix, the
default's targets="all") and with what weights. Their similarity is the default's (A x N rows), so
their FLOPs are the default's at the same schedule (greedy_pairs compares all N x N pairs).
"""
import torch

from tt_kernels.reference import cls_attention
from tt_kernels.reference.match import (_all_rows, _best_b_match, _ell, _kept_rows, _largest,
                                        _mask_of, affinity, bipartite_sets)


class Step:
    """What a construction sees at one reduction step: the default's metric (queries [B, N, D]),
    the block's queries and keys [B, H, N, Dh], sizes [B, N], r and the prefix."""

    def __init__(self, metric, q, k, size, r, prefix):
        self.metric, self.q, self.k, self.size = metric, q, k, size
        self.r, self.prefix = r, prefix
        B, N, _ = metric.shape
        self.a, self.b = bipartite_sets(N, prefix, metric.device)
        rows = self.a.nonzero()[:, 0]
        # [B, N, N]: A rows hold Ward's affinity to every token (-inf elsewhere), as the default
        self.affinity = _all_rows(affinity(metric, size, "ward", rows), rows, N)

    def default_keep(self):
        """The default's choice: all but the r A tokens closest (Ward) to some B token."""
        key, _ = _best_b_match(self.affinity, self.b)
        return ~_mask_of(_largest(key.masked_fill(~self.a, -torch.inf), self.r), key)

    def targets(self, keep):
        """[B, 1, N] the kept tokens after the prefix (the default's targets, "all")."""
        after_prefix = torch.arange(keep.shape[1], device=keep.device) >= self.prefix
        return (keep & after_prefix)[:, None, :]


def _spread_to(step, keep, top, weight):
    """T from `keep` and each removed token's targets `top` [B, N, K] (token indices) with
    weights `weight` [B, N, K] (0 for unused slots)."""
    dst = _kept_rows(keep).gather(1, top.flatten(1)).reshape(top.shape)
    return _ell(keep, torch.where(weight > 0, dst, 0), weight.float())


def adaptive(step, gap=0.01):
    """A removed token is split over its best two targets only when their Ward affinities are
    within `gap` of each other (softmax(affinity / gap) over the two), and merged whole
    otherwise. (Ward's affinity of unit tokens is (cosine - 1) / 2.)"""
    keep = step.default_keep()
    candidates = step.affinity.masked_fill(~step.targets(keep), -torch.inf)
    top = _largest(candidates, 2)
    aff = candidates.gather(-1, top)
    found = torch.isfinite(aff)
    split = found[..., 1:] & (aff[..., :1] - aff[..., 1:] < gap)
    soft = torch.softmax(aff.masked_fill(~found, -torch.inf) / gap, -1).nan_to_num(0.0)
    whole = torch.zeros_like(soft)
    whole[..., 0] = found[..., 0].to(soft.dtype)
    return _spread_to(step, keep, top, torch.where(split, soft, whole))


def by_attention(step, k=2):
    """A removed token spreads over its k closest targets (Ward), weighted by softmax over those
    targets of their attention logits to it (the block's own q . k, mean over heads)."""
    keep = step.default_keep()
    allowed = step.targets(keep)
    top = _largest(step.affinity.masked_fill(~allowed, -torch.inf), k)
    used = torch.isfinite(step.affinity.masked_fill(~allowed, -torch.inf).gather(-1, top))
    q, kk = step.q.double(), step.k.double()
    # logits[b, j, i]: target i's (mean over heads) attention logit to removed token j
    logits = torch.einsum("bhid,bhjd->bji", q, kk).div(q.shape[-1] ** 0.5 * q.shape[1])
    weight = torch.softmax(logits.gather(-1, top).masked_fill(~used, -torch.inf), -1)
    return _spread_to(step, keep, top, torch.where(used, weight, 0.0))


def output_centric(step, k=4, tau=0.1):
    """Each kept target gathers its k closest removed tokens (Ward); a removed token gathered by
    several targets is shared among them by softmax(affinity / tau), and one that no target
    gathered merges whole into its closest target (nothing is pruned)."""
    keep = step.default_keep()
    allowed = step.targets(keep)
    removed = ~keep
    aff = step.affinity.masked_fill(~allowed | ~removed[:, :, None], -torch.inf)  # [B, j, i]
    gathered = torch.zeros_like(aff, dtype=torch.bool)  # [B, j, i]: target i gathered j
    chosen = _largest(aff.transpose(1, 2), k)  # [B, i, k]: each target's k closest removed
    hit = torch.isfinite(aff.transpose(1, 2).gather(-1, chosen))
    gathered.transpose(1, 2).scatter_(-1, chosen, hit)
    best = _largest(aff, 1)  # [B, j, 1]
    orphan = removed & ~gathered.any(-1)
    gathered |= orphan[:, :, None] & torch.zeros_like(gathered).scatter_(-1, best, True)
    slots = max(int(gathered.sum(-1).max()), 1)
    top = _largest(torch.where(gathered, aff, -torch.inf), slots)
    logit = torch.where(gathered, aff, -torch.inf).gather(-1, top)
    used = torch.isfinite(logit)
    weight = torch.softmax(logit.masked_fill(~used, -1e9) / tau, -1)
    return _spread_to(step, keep, top, torch.where(used, weight, 0.0))


def prune_then_merge(step, share=0.25):
    """Of the r tokens that leave, the `share` least attended to by the class token (among the
    A tokens) are dropped, then the default merges the rest from the remaining A tokens; a
    hybrid of pruning uninformative tokens and merging redundant ones (PPT, DiffRate)."""
    score = cls_attention(step.q, step.k, step.size)
    dropped = round(share * step.r)
    low = _largest((-score.double()).masked_fill(~step.a, -torch.inf), dropped)
    drop = _mask_of(low, score)
    key, _ = _best_b_match(step.affinity, step.b)
    key = key.masked_fill(~step.a | drop, -torch.inf)
    keep = ~(drop | _mask_of(_largest(key, step.r - dropped), key))
    allowed = step.targets(keep)
    top = _largest(step.affinity.masked_fill(~allowed, -torch.inf), 1)
    weight = (~drop[..., None]).double() * torch.isfinite(
        step.affinity.masked_fill(~allowed, -torch.inf).gather(-1, top))
    return _spread_to(step, keep, top, weight)


def greedy_keep(step):
    """Who stays when ToMe's bipartite split is dropped (every token after the prefix may leave or
    receive, as in agglomerative merging): tokens in order of their best Ward affinity to any
    other; one leaves when it has received no token and its closest token is not leaving, and
    that one then stays; until r leave (a second pass, in the same order, takes tokens whose
    closest is leaving). Returns keep [B, N] and the affinities of all pairs [B, N, N] (N x N:
    twice the default's A x N similarity, which the sweep does not charge it)."""
    (B, N), device = step.size.shape, step.size.device
    free = torch.arange(N, device=device) >= step.prefix
    pairs = affinity(step.metric, step.size, "ward").masked_fill(
        ~(free[:, None] & free[None, :]) | torch.eye(N, dtype=torch.bool, device=device),
        -torch.inf)
    best, closest = pairs.max(-1)
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    for b in range(B):
        order = [j for j in _largest(best[b][None], N)[0].tolist() if free[j]]
        leaving, received = set(), set()
        for strict in (True, False):
            for j in order:
                p = int(closest[b, j])
                if len(leaving) < step.r and j not in leaving | received and not (
                        strict and p in leaving):
                    leaving.add(j)
                    received.add(p)
        keep[b, list(leaving)] = False
    return keep, pairs


def greedy_pairs(step):
    """greedy_keep's leavers, each merged whole into its closest kept token."""
    keep, pairs = greedy_keep(step)
    allowed = pairs.masked_fill(~step.targets(keep), -torch.inf)
    top = _largest(allowed, 1)
    return _spread_to(step, keep, top, torch.isfinite(allowed.gather(-1, top)).double())


CANDIDATES = {
    "adaptive split gap=0.01": lambda s: adaptive(s, 0.01),
    "adaptive split gap=0.03": lambda s: adaptive(s, 0.03),
    "attention weights k=2": lambda s: by_attention(s, 2),
    "attention weights k=4": lambda s: by_attention(s, 4),
    "output-centric k=2": lambda s: output_centric(s, 2),
    "output-centric k=4": lambda s: output_centric(s, 4),
    "prune 25% then merge": lambda s: prune_then_merge(s, 0.25),
    "prune 50% then merge": lambda s: prune_then_merge(s, 0.5),
    "greedy pairs, no bipartite split": greedy_pairs,
}


def install(patched, construction):
    """Runs `construction(Step) -> (dst, weight)` in every reduction step of `patched` (a model
    patched with the default settings), applied by the step's own tt.apply and mode."""
    tr = patched.token_reduction
    start = tr.start

    def start_with(n0, device):
        start(n0, device)
        _, apply, score, settings = tr._step
        mode = settings[6]

        def transform(x, size, metric, score, r, *rest):
            step = Step(metric, tr._q, tr._k, size, r, tr.prefix)
            dst, weight = construction(step)
            return (*apply(x, size, dst, weight, x.shape[1] - r, mode), dst, weight)

        tr._step = (transform, apply, score, settings)

    tr.start = start_with
    return patched
