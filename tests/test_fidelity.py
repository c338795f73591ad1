"""The fidelity protocol: photo splits that share no photo, the views of a photo, and bootstrap
intervals that resample photos, not views."""
import pytest
import torch

from tt_kernels import data
from tt_kernels.fidelity import agreement, interval, resamples


@pytest.fixture(scope="module")
def split_names(photos_installed):
    return {split: [name for name, _ in data.photos(split)] for split in data.SPLITS}


def test_splits_share_no_photo_and_cover_every_source(split_names):
    tuning, held_out = split_names["tuning"], split_names["held-out"]
    assert not set(tuning) & set(held_out)
    assert sorted(tuning + held_out) == sorted(name for name, _ in data.photos())
    for split in (tuning, held_out):  # both kinds in each, about half of each kind
        imagenet = sum(name.startswith("imagenet_") for name in split)
        assert imagenet == 10 and len(split) - imagenet == len(data.SKIMAGE_PHOTOS) // 2


def test_unknown_split_or_view_is_named(photos_installed):
    with pytest.raises(ValueError, match="`split`"):
        data.photos("test")
    with pytest.raises(ValueError, match="`views`.*'zoom 2'"):
        data.photo_batch(32, "tuning", ("centre", "zoom 2"))


def test_views_differ_and_are_named_by_photo(split_names):
    images, names = data.photo_batch(32, "held-out", data.VIEWS)
    assert images.shape == (len(split_names["held-out"]) * len(data.VIEWS), 3, 32, 32)
    assert names[:2] == [f"{split_names['held-out'][0]}/centre",
                         f"{split_names['held-out'][0]}/zoom 0.7"]
    assert [data.photo_of(n) for n in names[::len(data.VIEWS)]] == split_names["held-out"]
    first = images[:len(data.VIEWS)].flatten(1)
    distinct = torch.cdist(first, first) + torch.eye(len(first)) * 1e9
    assert distinct.min() > 1e-3  # no view repeats another
    # the mirror view of a centred square is the centre view flipped (bicubic resize commutes
    # with flipping up to a pixel of rounding at the crop's edges: compare the inner columns)
    centre, mirror = (images[list(data.VIEWS).index(v)] for v in ("centre", "mirror"))
    torch.testing.assert_close(mirror.flip(-1)[..., 2:-2], centre[..., 2:-2], atol=2 / 255,
                               rtol=0)


def test_resamples_draw_photos_with_all_their_views():
    photos = ["a", "a", "b", "b", "c", "c"]
    draws = resamples(photos, count=200, seed=1)
    assert all(len(d) == 6 for d in draws)  # three photos drawn, two views each
    for d in draws:
        drawn = [photos[i] for i in d.tolist()]
        for p in set(drawn):  # a drawn photo brings both views, once per draw
            assert drawn.count(p) % 2 == 0 and set(d.tolist()) >= {i for i, q in enumerate(photos)
                                                                    if q == p}
    assert len({tuple(d.tolist()) for d in draws}) > 10


def test_interval_brackets_the_mean_and_narrows_with_photos():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(20, generator=g, dtype=torch.float64)
    narrow = torch.randn(400, generator=g, dtype=torch.float64)
    lo, hi = interval(lambda i: wide[i].mean(), resamples([str(i) for i in range(20)]))
    assert lo < wide.mean().item() < hi
    # a mean of n unit normals has standard error 1/sqrt(n): the 95% interval is about
    # 2 * 1.96 / sqrt(n) wide (0.88 for 20, 0.20 for 400), within bootstrap noise
    assert 0.6 < hi - lo < 1.2
    lo, hi = interval(lambda i: narrow[i].mean(), resamples([str(i) for i in range(400)]))
    assert 0.14 < hi - lo < 0.26


def test_agreement_is_per_image():
    g = torch.Generator().manual_seed(0)
    ref = {"cls": torch.randn(3, 8, generator=g), "grid": torch.randn(3, 5, 8, generator=g),
           "saliency": torch.rand(3, 1, 4, 4, generator=g)}
    got = {k: v.clone() for k, v in ref.items()}
    got["cls"][1] = -got["cls"][1]
    got["saliency"][2] = 1 - got["saliency"][2]
    out = agreement(got, ref)
    torch.testing.assert_close(out["cls_cosine"], torch.tensor([1.0, -1.0, 1.0],
                                                               dtype=torch.float64))
    torch.testing.assert_close(out["patch_cosine"], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out["saliency_corr"], torch.tensor([1.0, 1.0, -1.0],
                                                                  dtype=torch.float64))
