"""Token Transforming inside a Vision Transformer, in one call.

    model = timm.create_model("deit_small_patch16_224")
    tt_kernels.patch(model, flops=0.6)          # or r=16, r=[...] per block, r={3: 60, 6: 40}
    model.token_reduction.k = 2                 # settings change at run time, no re-patching

The model may be of any family in tt_kernels.families (timm, HF transformers, open_clip): the
family says where its blocks, queries and keys are, and the step below is the same for all.

Each block reduces its tokens after the attention residual and before the MLP. The metric is the
block's attention queries or keys (all heads side by side), or its keys averaged over heads as
ToMe does (summed: the same cosines); the importance score (when the construction needs one) is
the class token's attention.

The default is the configuration that kept the most fidelity at equal FLOPs in
bench/sweep_fidelity.py: Ward's merge cost on the full queries, each removed token merged whole
(k=1) into its closest B token (ToMe's bipartite sets), merged tokens keeping their inputs' mean
norm. method="tome" is ToMe exactly (bipartite cosine matching on head-averaged keys,
size-weighted mean). Attention stays timm's own, fused SDPA included: proportional attention's
+log(size) per key enters SDPA in the form `attention=` chooses (tt_kernels.attention: a mask in
q's dtype, or an extra head column that keeps the flash kernel), and while every size is 1 nothing
is added, so a model with nothing to remove runs exactly as unpatched.
"""
import numbers
import operator
import types
import weakref
from dataclasses import dataclass, field, fields

import torch

from . import api, attention
from .backends import check_backend, implementation
from .families import family_of
from .flops import check_fraction, schedule_for_budget, step_sizes, vit_flops
from .ops import ops

METRICS = ("queries", "keys", "keys_mean")


def _state(**default):
    """A field of TokenReduction that holds the state of a forward, not a setting."""
    return field(metadata={"state": True}, repr=False, **default)


@dataclass
class TokenReduction:
    """The settings of a patched model (mutable at run time) and the state of its last forward.

    Settings are checked by patch() and again, before they are used, by the first forward after
    any of them changed (start); a change also solves the schedule anew."""

    r: object = 0  # int per block, list per block, {block: r} stages; ignored when flops is set
    flops: float = None  # fraction of the unreduced FLOPs to meet (schedule_for_budget)
    method: str = "spread"
    k: int = 1
    tau: float = 0.1
    source: str = "redundancy"
    alpha: float = None
    targets: str = "all"  # chosen by bench/sweep_fidelity.py's rule on the tuning photos
    cost: str = "ward"  # cost, mode and metric apply to method="spread"
    mode: str = "norm"
    metric: str = "queries"  # "queries" / "keys": all heads side by side; "keys_mean": averaged
    backend: str = None
    record: bool = False  # keep each step's T for restore() and visualisation
    attention: str = "auto"  # how the size bias enters attention (tt_kernels.attention.FORMS)
    prefix: int = 1
    # state of the last forward
    size: torch.Tensor = _state(default=None)
    steps: list = _state(default_factory=list)
    schedule: list = _state(default_factory=list)
    _q: torch.Tensor = _state(default=None)
    _k: torch.Tensor = _state(default=None)
    _capture: bool = _state(default=False)  # whether the running block's attention keeps _q, _k
    _model: object = _state(default=None)  # weak reference to the patched model
    _schedules: dict = _state(default_factory=dict)  # solved schedules, by token count and settings
    _step: tuple = _state(default=None)  # (transform, apply, cls_attention or None, settings)
    # per-token quantities a family carries through every step's T as the tokens are carried,
    # each [B, N, C] (its size-weighted mean over what a token holds): e.g. rotary embeddings
    carried: dict = _state(default_factory=dict)

    @property
    def by_importance(self):
        """Whether any unprotected token may leave (the lowest scores do)."""
        return self.method in ("prune", "evit") or (
            self.method == "spread" and api.removal_alpha(self.source, self.alpha) == 1)

    def needs_score(self):
        return self.method in ("prune", "evit") or (
            self.method == "spread" and api.removal_alpha(self.source, self.alpha) > 0)

    def op_settings(self):
        """tt.transform's settings after (x, size, metric, score, r): ToMe, prune and evit keep
        their published recipes, the op's defaults."""
        if self.method != "spread":
            return (self.method, 1, 0.1, 0.0, "all", self.prefix, "mean", "cosine")
        return ("spread", self.k, self.tau, api.removal_alpha(self.source, self.alpha),
                self.targets, self.prefix, self.mode, self.cost)

    def schedule_flops(self, model, n0, schedule=None):
        """FLOPs of one image under `schedule` (default: the last forward's), exact counter."""
        return vit_flops(model, n0, self.schedule if schedule is None else schedule, self.prefix,
                         self.by_importance, self.method, self.metric_dim(model))

    def metric_dim(self, model):
        """Width of the similarity metric, for the FLOPs counter."""
        heads, head_dim = family_of(model).heads
        full = self.method == "spread" and self.metric in ("queries", "keys")
        return heads * head_dim if full else head_dim

    def metric_of(self, queries, keys):
        """queries, keys [B, H, N, Dh] -> the similarity metric, [B, N, D] or per head [B, H, N,
        Dh], None where the construction compares no tokens (prune, evit)."""
        if self.method in ("prune", "evit"):
            return None
        if self.metric == "keys_mean" or self.method != "spread":
            # per head: the op compares the tokens by the keys' sum over heads (the mean's cosines)
            # as it reads them, faster than torch's sum over the strided heads on the CPU
            return keys
        return (queries if self.metric == "queries" else keys).transpose(1, 2).flatten(2)

    def settings(self):
        """Every setting's value, in field order."""
        return tuple(getattr(self, name) for name in SETTINGS)

    def validate(self, model, n0):
        """Raises one ValueError listing every setting that cannot be honoured in `model` with n0
        tokens entering its first block, each naming its argument and what is allowed."""
        family = family_of(model)
        checks = [
            lambda: _check_r(self.r, len(family.blocks)),
            lambda: self.flops is None or check_fraction(self.flops),
            *(lambda name=name: _check_by_the_ops(name, getattr(self, name), n0)
              for name in _OP_CHECKED),
            lambda: api.removal_alpha(self.source, self.alpha),
            lambda: _check_choice("metric", self.metric, METRICS),
            lambda: check_backend(self.backend),
            lambda: _check_type("record", self.record, bool),
            lambda: _check_form(self.attention, family),
        ]
        problems = [problem for problem in map(_problem, checks) if problem]
        if not problems and self.prefix == 0 and self.needs_score():  # settings valid together
            problems.append(
                "importance scores are the class token's attention: this model has no class "
                f"token, so method={self.method!r} with source={self.source!r} cannot be used")
        if problems:
            raise ValueError("tt_kernels.patch: " + "; ".join(problems))

    def resolve_schedule(self, model, n0):
        """Checks every setting, then solves the r each block removes from n0 tokens (capped at
        what the construction allows); a FLOPs budget below reach raises ValueError."""
        self.validate(model, n0)
        model = family_of(model)
        depth = len(model.blocks)
        if self.flops is not None:
            wanted = schedule_for_budget(model, n0, self.flops, self.prefix, self.by_importance,
                                         self.method, self.metric_dim(model))
        elif isinstance(self.r, dict):
            wanted = [self.r.get(i, 0) for i in range(depth)]
        elif isinstance(self.r, (list, tuple)):
            wanted = list(self.r)
        else:
            wanted = [self.r] * depth
        return [r for _, r in step_sizes(n0, wanted, self.prefix, self.by_importance,
                                          self.method)]

    def schedule_for(self, n0):
        """The schedule for n0 tokens under the current settings, solved (and the settings
        checked) once per token count and settings."""
        key = (n0, repr(self.settings()))  # repr: r may be a list or dict, changed in place
        if key not in self._schedules:
            self._schedules[key] = self.resolve_schedule(self._model(), n0)
        return self._schedules[key]

    def start(self, n0, device):
        """Begins a forward of n0 tokens on `device`: the schedule, and the kernels its steps
        call, chosen once for every block (a block then makes one op call, no API layer)."""
        self.size, self.steps, self.carried = None, [], {}
        self.schedule = list(self.schedule_for(n0))
        score = implementation("cls_attention", self.backend, device) if self.needs_score() \
            else None
        self._step = (implementation("transform", self.backend, device),
                      implementation("apply", self.backend, device), score, self.op_settings())

    def reduce(self, index, x):
        """Block `index`'s reduction step on its tokens x, between its attention (which left
        the queries and keys in _q, _k) and its MLP."""
        r = self.schedule[index]
        if r:
            transform, apply, cls_attention, settings = self._step
            size = self.size if self.size is not None else \
                torch.ones(x.shape[:2], device=x.device)
            score = cls_attention(self._q, self._k, size, None) if cls_attention else None
            x, self.size, dst, weight = transform(x, size, self.metric_of(self._q, self._k),
                                                  score, r, *settings)
            for name, value in self.carried.items():
                self.carried[name] = apply(value, size, dst, weight, x.shape[1], "mean")[0]
            if self.record:
                self.steps.append(api.SparseT(dst, weight, x.shape[1]))
        self._q = self._k = None
        return x


SETTINGS = tuple(f.name for f in fields(TokenReduction) if not f.metadata.get("state"))

# The construction settings that the ops' own argument checks (csrc/checks.cpp) cover, each with
# its type and a value the ops accept, to check one setting at a time.
_OP_CHECKED = {"method": (str, "spread"), "k": (numbers.Integral, 1),
               "tau": (numbers.Real, 0.1), "targets": (str, "all"), "cost": (str, "cosine"),
               "mode": (str, "mean")}
_TYPE_NAMES = {str: "a string", numbers.Integral: "an integer", numbers.Real: "a number",
               bool: "True or False"}


def _problem(check):
    """The message of the ValueError `check()` raises, or None."""
    try:
        check()
    except ValueError as error:
        return str(error)
    return None


def _check_by_the_ops(name, value, n0):
    """One construction setting through the ops' own checks, every other setting valid, with
    n0 tokens (on tensors of zero images: nothing is computed)."""
    _check_type(name, value, _OP_CHECKED[name][0])
    s = {setting: valid for setting, (_, valid) in _OP_CHECKED.items()} | {name: value}
    tokens, size = torch.empty(0, n0, 1), torch.empty(0, n0)
    try:
        ops.check_match(tokens, size, None, 0, s["method"], s["k"], s["tau"], 0.0, s["targets"],
                        0, s["cost"])
        ops.check_apply(tokens, size, tokens.long(), tokens, 0, s["mode"])
    except ValueError as error:  # "tt.match: `k` must ...": the setting is patch()'s, not the op's
        raise ValueError(str(error).split(": ", 1)[1]) from None


def _check_type(name, value, kind):
    # bool is an int to Python, but never a count or a number to patch()
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"`{name}` must be {_TYPE_NAMES[kind]}, got {value!r}")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")


def _check_r(r, depth):
    def count(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0

    if count(r) or (isinstance(r, (list, tuple)) and len(r) == depth and all(map(count, r))) or (
            isinstance(r, dict) and all(map(count, r.values()))
            and all(count(i) and i < depth for i in r)):
        return
    raise ValueError(f"`r` must be an integer >= 0 (tokens removed in every block), a list or "
                     f"tuple of {depth} of them (one per block) or a dict {{block index in "
                     f"[0, {depth}): integer >= 0}}, got {r!r}")


def _check_form(form, family):
    attention.check_form(form)
    if form not in family.forms:
        raise ValueError(f"`attention` must be one of {family.forms} for a {family.name}, got "
                         f"{form!r}")


def _unmasked(args, kwargs):
    """The keyword arguments a block passes on to its attention: all but its masks, which must
    be None or False."""
    masks = [a for a in args if a is not None and a is not False] + [
        v for name, v in kwargs.items()
        if ("mask" in name or name == "is_causal") and v is not None and v is not False]
    if masks:
        raise NotImplementedError("a patched block takes no attention mask and no is_causal")
    return {name: v for name, v in kwargs.items() if "mask" not in name and name != "is_causal"}


def _block_forward(self, x, *args, **kwargs):
    """Any family's block: attention, the reduction step, MLP (families/family.py). A block with
    nothing to do (no token to remove, every token still one patch) runs as unpatched."""
    call = _unmasked(args, kwargs) if args or kwargs else kwargs  # timm calls block(x)
    tr, parts = self.token_reduction, self.token_reduction_parts
    if self.token_reduction_index == 0:  # a new forward: its own schedule for its token count
        tr.start(x.shape[1], x.device)
    # A block with nothing to do runs its own forward (through the patched path r=0 ran at 0.991
    # of timm at batch 1 on a 2-core Xeon, so at 0.995: bench/results/processes-idle-blocks), and
    # its attention keeps no queries and keys, which nothing reads and its MLP would outlive.
    tr._capture = bool(tr.schedule[self.token_reduction_index]) or tr.size is not None
    if not tr._capture:
        return type(self).forward(self, x, *args, **kwargs)
    # each branch's output is a temporary, freed as soon as it is added (as in the unpatched
    # block): a name holding it would keep one more [B, N, D] alive through the MLP
    x = tr.reduce(self.token_reduction_index, x + _after(
        self, parts.after_attention, self.token_reduction_family.attend(
            self, getattr(self, parts.norm1)(x), tr.size, tr.attention, **call)))
    x = x + _after(self, parts.after_mlp, getattr(self, parts.mlp)(getattr(self, parts.norm2)(x)))
    return (x,) if parts.tuple_output else x


def _after(block, names, y):
    """The parts after a branch, in order: modules are called, a tensor (a layer scale kept as a
    bare parameter) multiplies, None is skipped."""
    for name in names:
        part = operator.attrgetter(name)(block)
        if isinstance(part, torch.Tensor):
            y = part * y
        elif part is not None:
            y = part(y)
    return y


def patch(model, r=0, *, flops=None, method="spread", k=1, tau=0.1, source="redundancy",
          alpha=None, targets="all", cost="ward", mode="norm", metric="queries", backend=None,
          record=False, attention="auto"):
    """Installs Token Transforming in `model`, in place; returns the model. The model is a
    timm VisionTransformer, an HF transformers vision model or an open_clip VisionTransformer
    (tt_kernels.families; anything else raises TypeError naming what is taken).

    r: tokens removed per block (int), per block (list), or per stage ({block index: r});
    flops: instead of r, a fraction of the unreduced FLOPs (e.g. 0.6) to meet from below
    (flops.schedule_for_budget).
    The other arguments are those of tt_kernels.transform (cost, mode and metric for method
    "spread" only; see the module's docstring). With record=True each forward keeps
    its steps' T in model.token_reduction.steps, for tt_kernels.restore and visualisation.
    attention: how proportional attention's +log(size) enters SDPA, "auto", "mask", "column" or
    "cudnn" (tt_kernels.attention).
    Every setting is checked first: one ValueError lists each that cannot be honoured, and the
    model is left as it was.
    """
    family = family_of(model)
    tr = TokenReduction(r=r, flops=flops, method=method, k=k, tau=tau, source=source, alpha=alpha,
                        targets=targets, cost=cost, mode=mode, metric=metric, backend=backend,
                        record=record, attention=attention,
                        prefix=family.prefix, _model=weakref.ref(model))
    # every setting checked now, not at the first forward (which checks them again only if changed)
    tr.schedule_for(family.n0)
    if hasattr(model, "token_reduction"):
        unpatch(model)
    for i, block in enumerate(family.blocks):
        block.token_reduction, block.token_reduction_index = tr, i
        block.token_reduction_family = type(family)
        block.token_reduction_parts = family.parts_of(block)
        block.forward = types.MethodType(_block_forward, block)
    model.token_reduction = tr
    model.token_reduction_handles = family.install(tr)
    return model


def unpatch(model):
    """Removes what patch() installed; the model is exactly as before."""
    for handle in model.token_reduction_handles:
        handle.remove()
    for block in family_of(model).blocks:
        del block.forward, block.token_reduction, block.token_reduction_index
        del block.token_reduction_family, block.token_reduction_parts
    del model.token_reduction, model.token_reduction_handles
    return model
