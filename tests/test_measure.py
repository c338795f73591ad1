"""tt_kernels.measure: the turns' order and statistics, and the CPU clock's calls."""
import math
import mmap
import platform
import subprocess
import sys
import time

import pytest
import torch

from tt_kernels import measure


def test_turns_alternate_the_order_and_take_medians():
    ran = []
    times = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 9.0, 4.0])}
    calls = {name: (lambda name=name: ran.append(name)) for name in times}

    def clock(fn):  # one call a turn; its "time" the candidate's next value
        fn()
        return [next(times[ran[-1]])]

    result = measure.time_in_turns(calls, 3, clock, warmup=2)
    assert ran == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert result["a"]["median_ms"] == 3.0 and result["b"]["median_ms"] == 4.0
    assert (result["a"]["min_ms"], result["a"]["max_ms"]) == (1.0, 5.0)
    assert result["a"]["times_ms"] == [5.0, 1.0, 3.0] and result["a"]["samples"] == 3


PAGE = mmap.PAGESIZE


@pytest.mark.skipif(measure.page_faults() is None, reason="no getrusage on this platform")
def test_turns_count_each_candidates_page_faults():
    """A candidate that writes a byte to each page of fresh anonymous memory faults once a page;
    one that allocates nothing, hardly at all."""
    pages = 2048

    def touch():
        with mmap.mmap(-1, pages * PAGE) as fresh:
            for page in range(pages):
                fresh[page * PAGE] = 1

    result = measure.time_in_turns({"touch": touch, "idle": lambda: None}, 3,
                                   measure.CpuClock(number=1))
    # a turn is Timer's three calls; Python's own allocations fault a few pages at most
    assert result["touch"]["page_faults"] >= 3 * pages
    assert result["idle"]["page_faults"] < pages // 10


_FREE_THEN_ALLOCATE = """
import sys, torch
from tt_kernels import measure
held = sys.argv[1] == "held" and measure.hold_freed_memory()
faults = []
for _ in range(3):
    torch.empty(16 << 20).fill_(1.0)  # 64 MiB touched, then freed
    before = measure.page_faults()
    torch.empty(8 << 20).fill_(1.0)  # 32 MiB: fits in what was just freed
    faults.append(measure.page_faults() - before)
print(int(held), min(faults), max(faults))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or measure.page_faults() is None,
                    reason="mallopt is glibc's")
def test_held_memory_is_taken_again_without_faults():
    """64 MiB touched and freed, then 32 MiB allocated and touched, three times, in a process of
    its own (holding is process-wide). With glibc's defaults the 64 MiB went back to the kernel and
    the 32 MiB are mapped afresh: a fault a page. Held, the 32 MiB lie in the 64 MiB just freed,
    whose pages are still the process's: no fault."""
    def run(malloc):
        out = subprocess.run([sys.executable, "-c", _FREE_THEN_ALLOCATE, malloc], check=True,
                             capture_output=True, text=True).stdout.split()
        return tuple(map(int, out))

    pages = (32 << 20) // PAGE
    held, _, most = run("held")
    assert held == 1 and most < pages // 100  # a stray page of Python's own, at most a few
    held, least, _ = run("default")
    assert held == 0 and least >= pages


def test_ratios_pair_the_samples_of_one_turn():
    """Turn by turn, b's time over a's is 2 while a swings by 4x across the turns: the ratio of
    every turn is 2, where ratios of unpaired samples would spread over 0.5 to 8."""
    a = measure.summary([1.0, 4.0, 2.0, 3.0])
    b = measure.summary([2.0, 8.0, 4.0, 6.0])
    paired = measure.ratio_by_turn(b, a)
    assert [paired[key] for key in ("median", "q1", "q3", "low", "high")] == [2.0] * 5
    spread = measure.ratio_by_turn(measure.summary([2.0, 8.0, 4.0, 6.0]),
                                   measure.summary([4.0, 1.0, 3.0, 2.0]))
    assert spread["q1"] < 2.0 < spread["q3"]
    with pytest.raises(ValueError, match="one sample a turn"):
        measure.ratio_by_turn(b, measure.summary([1.0]))


def test_median_interval_is_the_order_statistics_of_the_binomial_table():
    """The ranks of the 95% interval of a median in the standard tables (n = 6: the range; 20:
    6th and 15th; 100: 40th and 61st), whose coverage is 1 - 2 P(Binomial(n, 1/2) < k)."""
    for n, (k, coverage) in {6: (1, 1 - 2 / 64), 20: (6, 0.9586), 100: (40, 0.9648)}.items():
        low, high, got = measure.median_interval([float(v) for v in range(n, 0, -1)])
        assert (low, high) == (k, n + 1 - k)
        assert got == pytest.approx(coverage, abs=1e-4)  # the tables' four digits
    assert measure.median_interval([3.0, 1.0, 2.0])[2] == 1 - 2 / 8  # too few for 0.95


def test_median_interval_covers_the_median_as_often_as_it_says():
    """4000 seeded draws of 20 uniform samples: the share of intervals holding the true median
    0.5 is the stated coverage within 4 standard errors of a share of 4000 (0.013)."""
    g = torch.Generator().manual_seed(0)
    trials = [measure.median_interval(torch.rand(20, generator=g).tolist()) for _ in range(4000)]
    coverage = trials[0][2]
    share = sum(low <= 0.5 <= high for low, high, _ in trials) / len(trials)
    assert abs(share - coverage) <= 4 * math.sqrt(coverage * (1 - coverage) / len(trials))


def test_summary_quantiles():
    s = measure.summary([float(v) for v in range(1, 22)])  # 1 .. 21
    assert (s["median_ms"], s["q1_ms"], s["q3_ms"], s["p20_ms"], s["p80_ms"]) == \
        (11.0, 6.0, 16.0, 5.0, 17.0)


@pytest.mark.parametrize("repeats,turns,number", [(15, 5, 3), (3, 3, 1), (7, 5, 2), (1, 1, 1)])
def test_cpu_turns_cover_the_repeats(repeats, turns, number):
    got_turns, clock = measure.cpu_turns(repeats)
    assert (got_turns, clock.number) == (turns, number)


def test_cpu_clock_times_the_calls_after_two_discarded_ones():
    calls = []
    ms, = measure.CpuClock(number=3)(lambda: calls.append(torch.get_num_threads()))
    assert len(calls) == 2 + 3 and ms > 0
    assert set(calls) == {torch.get_num_threads()}  # Timer's default would be one thread


def test_tokens_with_heads_add_q_and_k_after_the_rest():
    plain = measure.vit_tokens(2, 17, C=8, D=16, seed=3, duplicates=True)
    t = measure.vit_tokens(2, 17, C=8, D=16, seed=3, duplicates=True, heads=3, head_dim=4,
                           dtype=torch.bfloat16)
    assert t["q"].shape == t["k"].shape == (2, 3, 17, 4) and t["k"].dtype == torch.bfloat16
    assert torch.equal(t["metric"], plain["metric"].bfloat16())
    assert torch.equal(t["size"], plain["size"]) and torch.equal(t["score"], plain["score"])


def test_event_clock_fills_its_time_with_calls(monkeypatch):
    """EventClock's arithmetic on a fake CUDA clock: each call takes 3 ms."""
    now = [0.0]

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = now[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []

    def fn():
        calls.append(1)
        now[0] += 3.0

    fill = measure.EventClock(fill_ms=10.0)
    assert fill(fn) == [3.0] and fill.calls == {fn: 4}  # 4 calls fill 10 ms: ceil(10 / 3)
    assert len(calls) == 1 + 4 and fill(fn) == [3.0] and len(calls) == 1 + 2 * 4
    assert measure.EventClock(fill_ms=1000.0, max_number=7)(fn) == [3.0] and len(calls) == 9 + 1 + 7
    fixed = measure.EventClock(number=2)
    assert fixed(fn) == [3.0] and fixed.calls == {} and len(calls) == 17 + 2


def test_same_weights_shares_the_weights_not_the_modules():
    from timm.models.vision_transformer import VisionTransformer

    import tt_kernels

    base = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
    patched = tt_kernels.patch(measure.same_weights(base), r=2)
    assert all(a is b for a, b in zip(base.parameters(), patched.parameters()))
    assert patched.blocks[0] is not base.blocks[0] and not hasattr(base, "token_reduction")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tt_kernels.patch(measure.same_weights(base), r=0)(x), base(x))


def test_seconds_add_turns_where_the_turns_asked_end_sooner():
    """time_forwards with `seconds` adds turns where `turns` would time less; 0 keeps `turns`."""
    def sleeper(x):
        time.sleep(0.01)

    models, x = {"a": sleeper, "b": sleeper}, torch.zeros(1)
    got = measure.time_forwards(models, x, 2, warmup=0, seconds=0.2)["a"]["samples"]
    assert 2 < got <= 10  # one of each sleeps at least 20 ms: at most 0.2 / 0.02 turns
    assert measure.time_forwards(models, x, 2, warmup=0)["a"]["samples"] == 2
