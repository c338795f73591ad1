"""The main job's parts: the real pretrained model's fidelity, the probe, the token map."""
import numpy as np
import pytest
import torch
from PIL import Image

import tt_kernels
from tt_kernels import data
from tt_kernels.evaluate import correlation, linear_probe
from tt_kernels.visualize import save_token_maps, token_owner


@pytest.fixture(scope="module")
def dinov2_and_photos():
    pytest.importorskip("onnx")
    dinov2_onnx = pytest.importorskip("tt_kernels.models.dinov2_onnx")
    try:
        dinov2_onnx.onnx_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    images, _ = data.photo_batch(224)
    return dinov2_onnx.load_dinov2_small(), data.normalize(images[::8])


def test_real_model_fidelity_regression(dinov2_and_photos):
    """DINOv2-S at 60% of its FLOPs keeps its CLS token (ToMe: ~0.99 on the full photo set)."""
    model, images = dinov2_and_photos
    with torch.inference_mode():
        want = model.forward_features(images)[:, 0]
        tt_kernels.patch(model, flops=0.6)
        got = model.forward_features(images)[:, 0]
        tt_kernels.unpatch(model)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.mean() > 0.97 and cos.min() > 0.85, cos


def test_linear_probe_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=g)
    y = (x[:, 0] > 0).long()
    x[:, 0] += 2 * y - 1  # a margin of 2 between the classes
    assert linear_probe(x[:40], y[:40], x[40:], y[40:]) >= 0.95


def test_correlation_of_maps():
    a = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(correlation(a, 2 * a + 1), torch.ones(3))
    torch.testing.assert_close(correlation(a, -a), -torch.ones(3))


def test_token_owner_follows_the_largest_share(tmp_path):
    # step 1: 5 tokens -> 3 (token 2 pruned, token 4 split 0.3 / 0.7 into rows 1 and 2)
    T1 = tt_kernels.Transform(torch.tensor([[[0, 0], [1, 0], [0, 0], [2, 0], [1, 2]]]),
                              torch.tensor([[[1., 0], [1, 0], [0, 0], [1, 0], [.3, .7]]]), 3)
    # step 2: 3 tokens -> 2 (row 2 merges into row 1)
    T2 = tt_kernels.Transform(torch.tensor([[[0], [1], [1]]]), torch.ones(1, 3, 1), 2)
    assert token_owner([T1, T2], 5, 1).tolist() == [[0, 1, -1, 1, 1]]
    image = torch.rand(3, 8, 8)
    path = save_token_maps(tmp_path / "tokens.png", image[None], [T1, T2], prefix=1, grid=(2, 2),
                           patch=4)
    assert Image.open(path).size == (16, 8)
    pixels = np.asarray(Image.open(path))[:, 8:]
    assert (pixels[:4, 4:] == 0).all()  # token 2 (patch 1: row 0, column 1) was pruned
    assert (pixels[4:, 4:] > 0).any()
