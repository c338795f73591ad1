"""tt_kernels.patch refuses settings it cannot honour, at patch() and before a forward uses a
setting changed at run time, and solves the schedule again whenever any setting changes."""
import math
import re

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tt_kernels
from tt_kernels.patch import SETTINGS, TokenReduction

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
N0 = 65  # 8 x 8 patches and the class token

# (bad setting, what the message must say): each names its argument and what is allowed.
BAD = [
    (dict(method="foo"), r"`method` must be one of prune, evit, tome, spread, got 'foo'"),
    (dict(k=0), r"`k` must lie in \[1, N = 65\], got 0"),
    (dict(k=2.0), r"`k` must be an integer, got 2.0"),
    (dict(k=True), r"`k` must be an integer, got True"),
    (dict(tau=0), r"`tau` must be positive, got 0"),
    (dict(tau=float("nan")), r"`tau` must be positive, got nan"),
    (dict(tau="0.1"), r"`tau` must be a number, got '0.1'"),
    (dict(metric="bar"), r"`metric` must be one of \('queries', 'keys', 'keys_mean'\), got 'bar'"),
    (dict(cost="x"), r"`cost` must be 'cosine' or 'ward', got 'x'"),
    (dict(mode="x"), r"`mode` must be 'mean', 'norm' or 'sum', got 'x'"),
    (dict(targets="x"), r"`targets` must be 'all' or 'b', got 'x'"),
    (dict(source="x"), r"`source` must be one of \('redundancy', 'importance', 'mix'\), got 'x'"),
    (dict(source="mix", alpha=1.5), r"`alpha` must be a number in \[0, 1\] or None, got 1.5"),
    (dict(alpha=0.5), r"`alpha` is only for source='mix', got source='redundancy'"),
    (dict(backend="gpu"), r"`backend` must be one of \('reference', 'cpu', 'cuda', 'triton'\)"),
    (dict(record=1), r"`record` must be True or False, got 1"),
    (dict(flops=0), r"`flops` must be a number in \(0, 1\] \(a fraction of the unreduced FLOPs\), "
                    r"got 0"),
    (dict(flops=1.5), r"`flops` must be a number in \(0, 1\].*, got 1.5"),
    (dict(flops=float("nan")), r"`flops` must be a number in \(0, 1\].*, got nan"),
    (dict(flops=True), r"`flops` must be a number in \(0, 1\].*, got True"),
    (dict(flops=0.05), r"`flops` must be at least 0\.\d{1,4}, the lowest fraction this model "
                       r"reaches with 65 tokens and method 'spread'.*, got 0.05"),
]
R_RULE = (r"`r` must be an integer >= 0 \(tokens removed in every block\), a list or tuple of 4 "
          r"of them \(one per block\) or a dict \{block index in \[0, 4\): integer >= 0\}, got ")
BAD += [(dict(r=r), R_RULE + re.escape(repr(r)))
        for r in (-1, 16.5, "16", True, [1, 2], [1, 2, 3, -1], (1, 2, 3, 4.0), {4: 1}, {-1: 1},
                  {0: -1}, {0.0: 1}, None)]
IDS = [",".join(f"{k}={v!r}" for k, v in setting.items()) for setting, _ in BAD]


def _model(**kw):
    torch.manual_seed(0)
    return VisionTransformer(**TINY, **kw).eval()


def _images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("setting,message", BAD, ids=IDS)
def test_patch_refuses_a_bad_setting_by_name(setting, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        tt_kernels.patch(model, **setting)  # r = 0 and no forward yet: still checked
    assert not hasattr(model, "token_reduction")


def test_patch_lists_every_bad_setting_at_once():
    with pytest.raises(ValueError) as error:
        tt_kernels.patch(_model(), r=-1, flops=2, method="foo", k=0, tau=0, metric="bar",
                         cost="x", mode="x", targets="x", source="x", backend="gpu")
    message = str(error.value)
    assert message.startswith("tt_kernels.patch: ")
    for name in ("r", "flops", "method", "k", "tau", "metric", "cost", "mode", "targets",
                 "source", "backend"):
        assert f"`{name}` must" in message


def test_settings_valid_alone_but_not_together():
    with pytest.raises(ValueError, match="this model has no class token, so method='prune'"):
        tt_kernels.patch(_model(global_pool="avg", class_token=False), r=4, method="prune")
    # ToMe uses no importance score: its ignored source is fine without a class token
    tt_kernels.patch(_model(global_pool="avg", class_token=False), r=4, method="tome",
                     source="importance")


def test_flops_below_reach_names_the_lowest_fraction():
    model = _model()
    with pytest.raises(ValueError, match="`flops` must be at least") as error:
        tt_kernels.patch(model, flops=0.05)
    lowest = float(re.search(r"at least ([0-9.]+)", str(error.value)).group(1))
    # the exact counter's FLOPs with every block but the last removing all it can (r = n0 is
    # capped at each block), rounded up to the 4 decimals of the message
    full = tt_kernels.vit_flops(model, N0, [0] * 4)
    tr = TokenReduction()
    most = tt_kernels.vit_flops(model, N0, [N0] * 3 + [0], 1, False, "spread",
                                tr.metric_dim(model))
    assert lowest == math.ceil(most / full * 1e4) / 1e4
    assert 0.2 < lowest < 0.6
    patched = tt_kernels.patch(model, flops=lowest)  # the fraction named can be met
    with torch.no_grad():
        patched(_images())
    assert patched.token_reduction.schedule_flops(model, N0) <= lowest * full
    with pytest.raises(ValueError, match="`flops` must be at least"):
        tt_kernels.patch(_model(), flops=lowest - 1e-3)


def test_a_refused_patch_leaves_the_patched_model_as_it_was():
    model = tt_kernels.patch(_model(), r=6)
    with pytest.raises(ValueError, match="`k`"):
        tt_kernels.patch(model, r=6, k=0)
    assert model.token_reduction.k == 1
    with torch.no_grad():
        model(_images())
    assert model.token_reduction.schedule == [6] * 4


# (setting changed at run time, what the message must say)
RUNTIME = [("k", 0, "`k` must lie in"), ("method", "foo", "`method` must be one of"),
           ("r", -1, "`r` must be an integer >= 0"), ("r", 16.5, "`r` must be an integer >= 0"),
           ("flops", 0.05, "`flops` must be at least"), ("flops", 1.5, r"`flops` must be a number"),
           ("metric", "bar", "`metric` must be one of"), ("alpha", 0.5, "`alpha` is only for"),
           ("tau", 0, "`tau` must be positive"), ("mode", "x", "`mode` must be"),
           ("backend", "gpu", "`backend` must be one of")]


@pytest.mark.parametrize("name,value,message", RUNTIME, ids=[f"{n}={v!r}" for n, v, _ in RUNTIME])
def test_settings_changed_at_run_time_are_checked_before_the_forward(name, value, message,
                                                                      monkeypatch):
    model = tt_kernels.patch(_model(), r=6)
    tr = model.token_reduction
    with torch.no_grad():
        want = model(_images())
    monkeypatch.setattr(tt_kernels.api, "transform",
                        lambda *args, **kwargs: pytest.fail("a block reduced with a bad setting"))
    old = getattr(tr, name)
    setattr(tr, name, value)
    with pytest.raises(ValueError, match=message):
        model(_images())
    with pytest.raises(ValueError, match=message):  # refused again, never cached
        model(_images())
    monkeypatch.undo()
    setattr(tr, name, old)
    with torch.no_grad():
        assert torch.equal(model(_images()), want)


def test_changing_alpha_solves_the_schedule_again():
    """alpha decides whether any token may leave (alpha = 1) or only ToMe's A set, which changes
    the caps on r; the cache once left alpha out of its key and kept the old schedule."""
    model = tt_kernels.patch(_model(), r=40, source="mix", alpha=0.5)
    with torch.no_grad():
        model(_images())
        assert model.token_reduction.schedule == [32, 16, 8, 4]  # ToMe's bipartite caps
        model.token_reduction.alpha = 1.0
        model(_images())
        assert model.token_reduction.schedule == [40, 24, 0, 0]  # any of n - 1 tokens may go
        model.token_reduction.alpha = 0.5
        model(_images())
        assert model.token_reduction.schedule == [32, 16, 8, 4]


def test_changing_r_in_place_solves_the_schedule_again():
    model = tt_kernels.patch(_model(), r=[0, 10, 0, 5])
    with torch.no_grad():
        model(_images())
        model.token_reduction.r[2] = 7
        model(_images())
    assert model.token_reduction.schedule == [0, 10, 7, 5]


# Another valid value of every setting.
CHANGES = dict(r=5, flops=0.8, method="tome", k=2, tau=0.2, source="mix", alpha=0.25,
               targets="b", cost="cosine", mode="mean", metric="keys", backend="reference",
               record=True, attention="mask", prefix=1)


def test_every_setting_is_in_the_schedule_cache_key(monkeypatch):
    """The cache key derives from every setting, so no schedule-relevant one can be left out."""
    assert set(SETTINGS) == set(CHANGES)
    model = tt_kernels.patch(_model(), r=4)
    tr = model.token_reduction
    solved = []
    resolve = TokenReduction.resolve_schedule
    monkeypatch.setattr(TokenReduction, "resolve_schedule",
                        lambda self, *args: solved.append(1) or resolve(self, *args))
    with torch.no_grad():
        model(_images())
        assert solved == []  # solved by patch() already
        for name, value in CHANGES.items():
            setattr(tr, name, value)
            model(_images())
            assert len(solved) == len(tr._schedules) - 1, name  # solved anew (and checked)
            model(_images())
            assert len(solved) == len(tr._schedules) - 1, name  # then once only
    assert len(solved) == len(CHANGES) - 1  # prefix=1 is no change
