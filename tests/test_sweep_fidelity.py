"""bench/sweep_fidelity.py and the many-to-many constructions it studies (bench/candidates.py):
each candidate's T is a valid T in the package's format, the adapter runs the default exactly
when the candidate builds the default's T, a shaped schedule meets its budget, the schedule
search stays within it, and the rule that chooses the default keeps it unless the photos tell a
challenger apart."""
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch

import tt_kernels

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # sweep_fidelity imports candidates from beside it
candidates = importlib.import_module("candidates")
_SPEC = importlib.util.spec_from_file_location("sweep_fidelity", BENCH / "sweep_fidelity.py")
sweep_fidelity = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sweep_fidelity)
sys.path.remove(str(BENCH))

BUDGET = 0.6


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96,
                              depth=4).eval()
    return model, torch.randn(2, 3, 96, 96)


def _run(model, images, construction=None):
    patched = tt_kernels.patch(copy.deepcopy(model), flops=BUDGET, record=True)
    if construction is not None:
        candidates.install(patched, construction)
    with torch.inference_mode():
        out = patched.forward_features(images)
    return out, patched.token_reduction.steps


def test_the_default_s_t_through_the_adapter_is_the_default(model_and_images):
    """adaptive() never splits at a vanishing gap: then it builds the T of its base setting
    (Ward's closest kept token, weight 1), and the model's output is bit-equal to that
    setting's."""
    model, images = model_and_images
    want, want_steps = _run(model, images)
    got, got_steps = _run(model, images, lambda s: candidates.adaptive(s, 1e-30))
    assert torch.equal(got, want)
    for g, w in zip(got_steps, want_steps):
        assert torch.equal(g.weight[..., 0], w.weight[..., 0])
        assert torch.equal(g.dst[..., 0], w.dst[..., 0])


@pytest.mark.parametrize("name", list(candidates.CANDIDATES))
def test_every_candidate_builds_a_valid_t(model_and_images, name):
    """A removed token's weights sum to 1 (size is conserved) and go to kept tokens' rows, or sum
    to 0 where prune_then_merge drops it (round(share * r) of them); kept tokens send 1 to their
    own row, in order; r tokens leave, as in the default."""
    model, images = model_and_images
    seen = []

    def recorded(step):
        seen.append(step)
        return candidates.CANDIDATES[name](step)

    _, steps = _run(model, images, recorded)
    assert len(steps) == len(_run(model, images)[1])
    for step, t in zip(seen, steps):
        total = t.weight.sum(-1)
        ones = (total - 1).abs() < 1e-6  # fp32 sum of fp32 shares: a few ulp
        assert t.n_out == t.weight.shape[1] - step.r and int(t.dst.max()) < t.n_out
        if "prune" in name:
            share = float(name.split("%")[0].split()[-1]) / 100
            assert ((total == 0).sum(1) == round(share * step.r)).all()
            assert (ones | (total == 0)).all()
            continue
        assert ones.all()
        keep = candidates.greedy_keep(step)[0] if "greedy" in name else step.default_keep()
        assert (~keep).sum(1).eq(step.r).all() and keep[:, :step.prefix].all()
        own = keep.long().cumsum(1) - 1
        assert torch.equal(t.dst[..., 0][keep], own[keep])
        assert (t.weight[..., 0][keep] == 1).all() and (t.weight[..., 1:][keep] == 0).all()


def test_greedy_pairs_leave_across_the_bipartite_split():
    """Tokens 1-2 and 3-4 are the closest pairs, 5-6 a less close one: with r = 2 the first of
    each of the two closest leaves (1 and 3, B tokens in ToMe's split, which never leave there)
    and its partner, having received, stays."""
    metric = torch.tensor([[[0.0, 0, 1], [1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0.01, 1, 0],
                            [1, 0.2, 0.1], [1, 0.25, 0.1]]]).double()
    step = candidates.Step(metric, None, None, torch.ones(1, 7), 2, 1)
    keep, _ = candidates.greedy_keep(step)
    assert keep.tolist() == [[True, False, True, False, True, True, True]]


def test_output_centric_spreads_where_targets_gather(model_and_images):
    """With k >= 2 targets gathering each, some removed token is shared by several outputs."""
    model, images = model_and_images
    _, steps = _run(model, images, candidates.CANDIDATES["output-centric k=4"])
    assert any(((s.weight > 0).sum(-1) > 1).any() for s in steps)


@pytest.mark.parametrize("slope", sweep_fidelity.SLOPES)
def test_shaped_schedule_meets_the_budget_and_leans_as_asked(model_and_images, slope):
    model, _ = model_and_images
    model = copy.deepcopy(model)
    n0 = model.patch_embed.num_patches + 1
    schedule = sweep_fidelity.shaped_schedule(model, n0, BUDGET, slope)
    full = tt_kernels.vit_flops(model, n0, [0] * len(model.blocks))
    dim = model.blocks[0].attn.qkv.in_features
    assert tt_kernels.vit_flops(model, n0, schedule, metric_dim=dim) <= BUDGET * full
    # the least scale that fits: one more token in the first block exceeds the budget
    assert schedule[-1] == 0 and (schedule[0] > schedule[-2]) == (slope > 0)


def test_searched_schedule_moves_removal_where_the_loss_asks_within_the_budget(
        model_and_images):
    """A loss that charges each token removed in block 0 (say, a fragile first block) leads the
    search to remove fewer there and more elsewhere, within the budget; a loss the solver's
    schedule already minimises leaves it as it is."""
    model, _ = model_and_images
    model = copy.deepcopy(model)
    n0 = model.patch_embed.num_patches + 1
    solved = tt_kernels.patch(copy.deepcopy(model), flops=BUDGET).token_reduction \
        .resolve_schedule(model, n0)
    full = tt_kernels.vit_flops(model, n0, [0] * len(model.blocks))
    dim = model.blocks[0].attn.qkv.in_features
    seen = []

    def fragile_first(r):
        seen.append(list(r))
        return r[0] + 0.001 * sum(r)  # fewer at block 0, and no more removed than needed

    found, loss, evaluated = sweep_fidelity.searched_schedule(model, n0, BUDGET, fragile_first)
    assert evaluated == len(seen) and seen[0] == solved  # from the solver's schedule
    assert found[0] < solved[0] and found[-1] == 0 and loss == fragile_first(found)
    for r in seen:  # every schedule tried is within the budget, the similarity counted
        assert tt_kernels.vit_flops(model, n0, r, metric_dim=dim) <= BUDGET * full
    unchanged, _, _ = sweep_fidelity.searched_schedule(
        model, n0, BUDGET, lambda r: float(r != solved))
    assert unchanged == solved


def _rows_and_losses(challenger_loss, images=40):
    """Rows and tuning CLS cosines of ToMe, the default and one challenger at two budgets; per
    image CLS losses: ToMe 0.02, the default 0.01, the challenger `challenger_loss(i)`."""
    names = {sweep_fidelity.TOME: lambda i: 0.02, sweep_fidelity.INCUMBENT: lambda i: 0.01,
             "challenger": challenger_loss}
    rows, cls = [], {}
    for budget in (0.6, 0.8):
        for name, loss in names.items():
            cls[name, budget] = 1 - torch.tensor([loss(i) for i in range(images)],
                                                 dtype=torch.float64)
            ratio = (1 - cls[name, budget]).mean() / 0.02
            rows.append(dict(name=name, kind="ops", budget=budget,
                             tuning={"cls_loss_to_tome": ratio.item()}))
    return rows, cls


@pytest.mark.parametrize("spread, switches", [(0.0, True), (0.008, False)])
def test_the_default_changes_only_for_a_difference_the_photos_tell(spread, switches):
    """A challenger with 10% less loss on every image replaces the default; one with 10% less
    on average but alternating +-`spread` between photos (20 photos, 2 views each) keeps it."""
    from tt_kernels.fidelity import resamples
    rows, cls = _rows_and_losses(lambda i: 0.009 + spread * (-1) ** (i // 2))
    draws = resamples([str(i // 2) for i in range(40)], count=500)
    chosen = sweep_fidelity.choose(rows, cls, draws)
    assert chosen["best"] == "challenger"
    assert chosen["loss_to_default"] == pytest.approx(0.9)
    assert chosen["default"] == ("challenger" if switches else sweep_fidelity.INCUMBENT)
