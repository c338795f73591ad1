"""Measuring, written once for the tests, bench/, scripts/ and the self-test: inputs that look like
a ViT block's tokens, and timing in turns. (What a measurement ran on: tt_kernels.machine.)

Timing in turns. The candidates (backends of one op, rows of a model benchmark, forms of attention)
are timed in the same process, turn after turn, each turn timing every candidate once (in order,
then in reverse order: A B, B A, ...), so that a change of load on a shared machine, or of clock on
a GPU, hits all of them alike. A candidate's time is the median of what its clock measured over
the turns (a sample a turn; do_bench's: one a call); a ratio of two candidates is the ratio of their
medians, and the ratio turn by turn (ratio_by_turn: its median, quartiles and the median's 95%
interval) says how far that one ratio can be trusted. A clock times one candidate in one turn:

  CpuClock      torch.utils.benchmark.Timer.timeit: wall time of `number` calls after the two that
                Timer runs first and discards, so each turn opens on caches of its own and no
                candidate is timed on caches another just evicted. Timer's own default of one
                thread is replaced by torch's thread count as it is set.
  DoBenchClock  triton.testing.do_bench: CUDA events around single calls with the L2 cache flushed
                before each, an op meeting its inputs as one layer of a network does; `warmup_ms`
                and `rep_ms` of a turn.
  EventClock    CUDA events around `number` calls back to back (or as many as fill `fill_ms`,
                found once per candidate), L2 not flushed. For what do_bench does not fit: whole
                forwards, whose weights and activations stay warm in a served model, and attention
                calls, whose q, k, v the projection has just written; both counted in calls, not
                in do_bench's milliseconds.

The turns also count the process's minor page faults (page_faults): memory the allocator handed
back to the kernel and takes again costs a fault a page, and how much that is depends on what the
candidates before freed. A benchmark that compares the candidates' own work holds freed memory
first (hold_freed_memory, a benchmark's --malloc held).
"""
import copy
import ctypes
import functools
import math
import platform
import statistics
import time

import torch
from torch.utils import benchmark


def vit_tokens(B, N, C=24, D=16, dtype=torch.float32, seed=0, duplicates=False, unit_size=False,
               heads=0, head_dim=64, device="cpu"):
    """x [B, N, C] and metric [B, N, D] in `dtype`, fp32 size [B, N] and score [B, N]; with
    `heads`, also q and k [B, heads, N, head_dim] in `dtype`. Drawn from one generator seeded with
    `seed` on `device`, in that order (the tests' seeds screen for near ties: the order stays).

    The metric and k have a shared component per image (as attention keys do), so similarities are
    mostly positive and close; the score is a softmax over tokens, as the class attention is; sizes
    are 1 to 4 (as after earlier merges), or 1 with `unit_size`. With `duplicates`, several groups
    of tokens get exactly the same metric row and score, so that selections and top-k choices meet
    exact ties (which must go to the lower index) whatever the rounding.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    x = randn(B, N, C)
    metric = randn(B, N, D) + 1.5 * randn(B, 1, D)
    score = (2 * randn(B, N)).softmax(-1)
    if unit_size:
        size = torch.ones(B, N, device=device)
    else:
        size = torch.randint(1, 5, (B, N), generator=g, device=device).float()
    if duplicates and N > 8:
        # Each group's shared row has entries +-2^-3 (D = 16): its normalised entries, their
        # products and any sum of them are exact, so the cosine of two members is exactly 1 in
        # every summation order, and ties across groups stay exact in kernels that round
        # differently from the reference.
        assert D == 16, "duplicate rows assume D = 16"
        for group, start in enumerate(range(2, N - 6, max(N // 4, 7))):
            rows = [start, start + 1, start + 3, start + 6][: 2 + group % 3]
            signs = torch.randint(0, 2, (B, 1, D), generator=g, device=device).float() * 2 - 1
            metric[:, rows] = signs / 8
            score[:, rows] = score[:, rows[:1]]
    tokens = dict(x=x.to(dtype), size=size, metric=metric.to(dtype), score=score)
    if heads:
        tokens["q"] = randn(B, heads, N, head_dim).to(dtype)
        tokens["k"] = (randn(B, heads, N, head_dim) + 1.5 * randn(B, 1, 1, head_dim)).to(dtype)
    return tokens


# ----------------------------------------------------------------------------- clocks


class CpuClock:
    """ms per call of `number` calls, one sample a turn (module docstring)."""

    def __init__(self, number=1):
        self.number = number

    def __call__(self, fn):
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                num_threads=torch.get_num_threads())
        return [timer.timeit(self.number).median * 1e3]

    def __str__(self):
        return (f"torch.utils.benchmark.Timer.timeit({self.number}) per turn, after its 2 "
                f"discarded calls, {torch.get_num_threads()} threads")


def same_weights(model):
    """A copy of `model` with modules of its own (to patch) and `model`'s parameters and buffers,
    for rows timed against each other: one set of weights in memory, the same for every row (the
    bound is the same model by construction). What a copy itself moves a row's speed by:
    bench/bench_weight_copies.py (DeiT-S at batch 1 on a 2-core Xeon: deep copies and these alike
    within 1.5% of the model)."""
    return copy.deepcopy(model, {id(t): t for t in (*model.parameters(), *model.buffers())})


def cpu_turns(repeats, turns=5):
    """(turns, CpuClock) timing `repeats` calls of each candidate (rounded up to a multiple of the
    turns) in at most `turns` turns: fewer turns than calls, as each turn costs Timer's two
    discarded calls."""
    turns = max(1, min(turns, repeats))
    return turns, CpuClock(-(-repeats // turns))


class DoBenchClock:
    """Every call's ms that triton.testing.do_bench measured in a turn (module docstring)."""

    def __init__(self, warmup_ms=25.0, rep_ms=100.0):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def __call__(self, fn):
        from triton.testing import do_bench
        return list(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all"))

    def __str__(self):
        return (f"triton.testing.do_bench(warmup={self.warmup_ms:g} ms, rep={self.rep_ms:g} ms) "
                "per turn: CUDA events around each call, L2 flushed before each; host-side launch "
                "cost included")


class EventClock:
    """ms per call of `number` calls back to back between two CUDA events, one sample a turn; with
    `fill_ms`, as many calls as fill it (at most `max_number`), from one timed call the first time
    a candidate is seen, kept in `calls` (candidate -> calls per turn)."""

    def __init__(self, number=1, fill_ms=None, max_number=50):
        self.number, self.fill_ms, self.max_number = number, fill_ms, max_number
        self.calls = {}

    @staticmethod
    def _span_ms(fn, number):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def __call__(self, fn):
        if self.fill_ms is None:
            return [self._span_ms(fn, self.number) / self.number]
        if fn not in self.calls:
            self.calls[fn] = max(1, min(self.max_number, math.ceil(
                self.fill_ms / max(self._span_ms(fn, 1), 1e-3))))
        return [self._span_ms(fn, self.calls[fn]) / self.calls[fn]]

    def __str__(self):
        calls = f"{self.number} calls" if self.fill_ms is None else \
            f"as many calls as fill {self.fill_ms:g} ms (at most {self.max_number})"
        return f"CUDA events around {calls} per turn, synchronised, L2 not flushed"


# ----------------------------------------------------------------------------- memory

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def hold_freed_memory():
    """Have glibc's malloc keep, for the rest of the process, the memory the process frees: the
    heap is never trimmed (M_TRIM_THRESHOLD at its largest) and no block is mapped on its own
    (M_MMAP_MAX 0), so none is unmapped when freed, and a later allocation that fits in freed
    memory takes no fresh pages. True where it took effect; False off glibc, whose malloc is then
    as it was.

    Why: with glibc's defaults a large buffer, once freed, may go back to the kernel, and the next
    one then takes fresh pages at a fault each (a kernel entry and a zeroed page), as the heap's
    state happens to allow. On a 2-core Xeon at batch 16, DeiT-S's rows in bench_model --malloc
    default took from 34,000 (the bounds) to 185,000 (patched with r=0) minor faults a turn of
    three forwards, in amounts that change from run to run; held, none. Held, the candidates reuse
    what they free, as under the reusing allocators (jemalloc, tcmalloc) that PyTorch's CPU tuning
    guide recommends.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_MAX, 0))


def add_malloc_argument(parser):
    """A timing command's --malloc, which use_malloc applies."""
    parser.add_argument("--malloc", choices=("held", "default"), default="held",
                        help="held: glibc's malloc keeps freed memory, so that no candidate pays "
                             "page faults for what another freed (default); default: malloc as "
                             "it is")


def use_malloc(choice):
    """A timing command's --malloc: "held" holds freed memory (hold_freed_memory), "default"
    leaves malloc as it is. Returns what to record: the choice, or "default (held needs glibc)"."""
    if choice == "held" and not hold_freed_memory():
        return "default (held needs glibc)"
    return choice


def page_faults():
    """The minor page faults of this process so far, all threads (getrusage); None where the
    platform has no `resource` module."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ----------------------------------------------------------------------------- turns


def summary(times_ms):
    """Median, extremes, quartiles and 20/80 % quantiles of samples in ms; the samples kept in
    the order given (time_in_turns': turn by turn)."""
    times = sorted(times_ms)
    cuts = statistics.quantiles(times, n=20, method="inclusive") if len(times) > 1 else times * 19
    return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1],
            "q1_ms": cuts[4], "q3_ms": cuts[14], "p20_ms": cuts[3], "p80_ms": cuts[15],
            "samples": len(times), "times_ms": list(times_ms)}


def median_interval(samples, level=0.95):
    """(low, high, coverage): the distribution-free interval of the population median from
    independent samples of one distribution, between the k-th smallest and the k-th largest
    sample, k the largest whose coverage is at least `level`. The count of samples below the
    median is Binomial(n, 1/2), so the interval misses it with probability 2 P(count < k); that
    gives its coverage. Below 6 samples no interval reaches 0.95: there it is the whole range,
    with its own coverage (1 - 2^(1 - n))."""
    x, n = sorted(samples), len(samples)

    def coverage(k):
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while 2 * (k + 1) <= n + 1 and coverage(k + 1) >= level:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


def ratio_by_turn(numerator, denominator):
    """Over the turns, numerator's time / denominator's in the same turn, for two summaries of one
    time_in_turns with a sample a turn: the median and quartiles, and the median's 95% interval
    (median_interval, its coverage beside it). Both candidates of a turn meet the same load, so
    the ratios move less than the times; the quartiles show how far one turn's ratio moves, the
    interval how far the median of this many turns can lie from the one many more would give (it
    takes the turns' ratios as independent: load that persists over many turns narrows it
    falsely, which runs in other processes show). A goal inside the interval is not settled by
    the run."""
    a, b = numerator["times_ms"], denominator["times_ms"]
    if len(a) != len(b):
        raise ValueError(f"one sample a turn is needed: {len(a)} against {len(b)} samples")
    ratios = [x / y for x, y in zip(a, b)]
    quantiles = summary(ratios)
    low, high, coverage = median_interval(ratios)
    return {"median": quantiles["median_ms"], "q1": quantiles["q1_ms"], "q3": quantiles["q3_ms"],
            "low": low, "high": high, "coverage": coverage}


def time_in_turns(calls, turns, clock, warmup=0):
    """{name: summary(...) and "page_faults"} of each zero-argument callable in `calls` ({name:
    fn}): `warmup` calls of each discarded, then `turns` turns of `clock` over every candidate, in
    order and then in reverse order by turns (module docstring). page_faults: the median over the
    turns of the minor page faults in a candidate's turn (every call its clock made), None where
    page_faults() is."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    names = list(calls)
    samples = {name: [] for name in names}
    faults = {name: [] for name in names}
    for turn in range(turns):
        for name in names if turn % 2 == 0 else reversed(names):
            before = page_faults()
            samples[name] += clock(calls[name])
            if before is not None:
                faults[name].append(page_faults() - before)
    return {name: dict(summary(times), page_faults=statistics.median(faults[name])
                       if faults[name] else None) for name, times in samples.items()}


@torch.inference_mode()
def time_forwards(models, x, turns, warmup=2, seconds=0.0, fill_ms=10.0, max_number=50):
    """{name: summary(...) and "calls_per_turn"} of each model(x) ({name: model}), timed in turns:
    on CUDA an EventClock with as many forwards a turn as fill `fill_ms` (launch jitter small beside
    them), on the CPU one forward a turn (CpuClock). With `seconds`, more turns than `turns` where
    those would time less than that many seconds of forwards (one forward of each model, timed
    first, sets the count)."""
    calls = {name: functools.partial(model, x) for name, model in models.items()}
    if seconds:
        turns = max(turns, math.ceil(seconds / _one_of_each(calls.values(), x.is_cuda)))
    clock = EventClock(fill_ms=fill_ms, max_number=max_number) if x.is_cuda else CpuClock()
    times = time_in_turns(calls, turns, clock, warmup)
    for name, fn in calls.items():
        times[name]["calls_per_turn"] = clock.calls[fn] if x.is_cuda else clock.number
    return times


def _one_of_each(calls, cuda):
    """Seconds one call of each takes, in all."""
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for fn in calls:
        fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started
