"""The main job's parts: the real pretrained model's fidelity, the probe, the token map, and top-1
on an ImageFolder with the model's own preprocessing, in one process and split over two."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import tt_kernels
from tt_kernels import data, evaluate
from tt_kernels.evaluate import imagefolder_top1, linear_probe
from tt_kernels.fidelity import correlation
from tt_kernels.models.named import timm_transform
from tt_kernels.visualize import save_token_maps, token_owner

ROOT = Path(__file__).resolve().parents[1]
TINY = "test_vit"  # timm's 160 px, 6-block, 64-wide ViT: builds offline, random init


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
    T1 = tt_kernels.SparseT(torch.tensor([[[0, 0], [1, 0], [0, 0], [2, 0], [1, 2]]]),
                              torch.tensor([[[1., 0], [1, 0], [0, 0], [1, 0], [.3, .7]]]), 3)
    # step 2: 3 tokens -> 2 (row 2 merges into row 1)
    T2 = tt_kernels.SparseT(torch.tensor([[[0], [1], [1]]]), torch.ones(1, 3, 1), 2)
    assert token_owner([T1, T2], 5, 1).tolist() == [[0, 1, -1, 1, 1]]
    image = torch.rand(3, 8, 8)
    path = save_token_maps(tmp_path / "tokens.png", image[None], [T1, T2], prefix=1, grid=(2, 2),
                           patch=4)
    assert Image.open(path).size == (16, 8)
    pixels = np.asarray(Image.open(path))[:, 8:]
    assert (pixels[:4, 4:] == 0).all()  # token 2 (patch 1: row 0, column 1) was pruned
    assert (pixels[4:, 4:] > 0).any()


def test_timm_transform_is_the_models_own(tmp_path):
    """crop_pct, interpolation, mean and std come from the model's config, not 256/224 bicubic."""
    timm = pytest.importorskip("timm")
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    model = timm.create_model(TINY, pretrained=False, pretrained_cfg_overlay=dict(
        crop_pct=0.9, interpolation="bilinear", mean=mean, std=std))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 210, 3), np.uint8))
    want = TF.resize(image, 177, TF.InterpolationMode.BILINEAR)  # floor(160 / 0.9), shorter side
    want = TF.normalize(TF.to_tensor(TF.center_crop(want, 160)), mean, std)
    transform, config = timm_transform(model)
    assert (config["crop_pct"], config["interpolation"]) == (0.9, "bilinear")
    torch.testing.assert_close(transform(image), want, rtol=0, atol=0)  # the same PIL operations


LABELS = [0, 1, 2, 0, 1, 2, 0]  # 7 images: two processes split them 4 + 4, one repeated
HEAD_SAYS = [0, 1, 2, 2, 0, 2, 1]  # the classifier written below agrees on images 0, 1, 2, 5


@pytest.fixture(scope="module")
def folder_and_checkpoint(tmp_path_factory):
    """A 3-class ImageFolder of 7 PNGs and a TINY checkpoint whose head (fitted by least squares
    to the unreduced model's features) predicts HEAD_SAYS among classes 0-2 only."""
    timm = pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    files = []
    for i, label in enumerate(LABELS):
        pixels = rng.normal(colours[label], 60, (90 + 10 * i, 120, 3)).clip(0, 255)
        (root / f"class{label}").mkdir(exist_ok=True)
        files.append(root / f"class{label}" / f"{i}.png")
        Image.fromarray(pixels.astype(np.uint8)).save(files[-1])
    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False).eval()
    transform, _ = timm_transform(model)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(
            torch.stack([transform(Image.open(f).convert("RGB")) for f in files])), pre_logits=True)
        target = torch.eye(3, dtype=torch.float64)[HEAD_SAYS]
        w = torch.linalg.lstsq(feats.double(), target).solution  # exact: 7 points in 64 dims
        model.head.weight.zero_()
        model.head.weight[:3] = w.T.float()
        model.head.bias.fill_(-100.0)  # classes 3-999 never win
        model.head.bias[:3] = 0
    checkpoint = root.parent / "tiny.pth"
    torch.save(model.state_dict(), checkpoint)
    return root, checkpoint


def _direct_top1(model, root, transform):
    """Correct predictions, one image at a time, classes being the sorted folder names."""
    hits = 0
    for label, cls in enumerate(sorted(os.listdir(root))):
        for name in sorted(os.listdir(root / cls)):
            x = transform(Image.open(root / cls / name).convert("RGB"))[None]
            hits += int(model(x).argmax(1).item() == label)
    return hits


def test_imagefolder_top1_matches_a_direct_loop(folder_and_checkpoint):
    """Batches of 3 through 2 DataLoader workers count what one image at a time counts."""
    timm = pytest.importorskip("timm")
    root, checkpoint = folder_and_checkpoint
    model = timm.create_model(TINY, pretrained=False, checkpoint_path=str(checkpoint)).eval()
    models = {"unreduced": model, "tome": tt_kernels.patch(
        timm.create_model(TINY, pretrained=False, checkpoint_path=str(checkpoint)).eval(),
        flops=0.7, method="tome")}
    transform, _ = timm_transform(model)
    got = imagefolder_top1(root, models, transform, torch.device("cpu"), batch=3, workers=2)
    with torch.inference_mode():
        want = {name: _direct_top1(m, root, transform) for name, m in models.items()}
    assert want["unreduced"] == 4, want  # the head agrees with LABELS on 4 images by construction
    assert got == {name: (hits, len(LABELS)) for name, hits in want.items()}


def _job_args(root, checkpoint, out):
    return ["--device", "cpu", "--model", TINY, "--checkpoint", str(checkpoint), "--data",
            str(root), "--out", str(out), "--images", "2", "--probe-images", "0", "--budgets",
            "0.7", "--methods", "tome", "--skip-speed", "--quiet", "--workers", "0", "--batch", "2"]


def test_torchrun_splits_top1_and_writes_once(folder_and_checkpoint, tmp_path, photos_installed):
    """2 gloo processes count the same top-1 as one process, each image once (not the sampler's
    8), and only rank 0 prints and writes."""
    root, checkpoint = folder_and_checkpoint
    one = evaluate.main(_job_args(root, checkpoint, tmp_path / "one"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "tt_kernels.evaluate",
                          *_job_args(root, checkpoint, tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("tt_kernels evaluate:") == 1 and run.stdout.count("wrote ") == 1, \
        run.stdout
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (two["processes"], two["top1_images"]) == (2, len(LABELS))
    assert [(r["method"], r["top1_correct"]) for r in two["rows"]] == \
        [(r["method"], r["top1_correct"]) for r in one]
    assert one[0]["top1_correct"] == 4  # the unreduced model, as the head was written


def test_main_job_takes_an_hf_model_folder_and_its_preprocessing(folder_and_checkpoint, tmp_path,
                                                                 photos_installed):
    """--model hf:<folder>: the classifier and image processor saved by save_pretrained, top-1
    through the processor's own preprocessing, every configuration patched."""
    transformers = pytest.importorskip("transformers")
    root, _ = folder_and_checkpoint
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=64, patch_size=8, hidden_size=48,
                                    num_hidden_layers=3, num_attention_heads=3,
                                    intermediate_size=192, num_labels=3)
    folder = tmp_path / "hf-vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    processor = transformers.ViTImageProcessor(size={"height": 64, "width": 64},
                                               image_mean=[0.4] * 3, image_std=[0.2] * 3)
    processor.save_pretrained(folder)
    args = ["--device", "cpu", "--model", f"hf:{folder}", "--data", str(root), "--out",
            str(tmp_path / "out"), "--images", "2", "--probe-images", "0", "--budgets", "0.7",
            "--methods", "tome", "spread (default)", "--skip-speed", "--quiet", "--workers", "0",
            "--batch", "2"]
    rows = evaluate.main(args)
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("unreduced", 1.0), ("tome", 0.7), ("spread (default)", 0.7)]
    assert all(r["top1_correct"] <= len(LABELS) for r in rows)
    assert rows[1]["gflops"] <= 0.7 * rows[0]["gflops"] and sum(rows[1]["schedule"]) > 0
    assert rows[0]["cls_cosine"] == pytest.approx(1.0, abs=1e-6)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["preprocessing"]["image_mean"] == [0.4] * 3
    assert (tmp_path / "out" / "tokens.png").exists()


def test_main_job_takes_an_open_clip_architecture(tmp_path, photos_installed):
    """--model open_clip:ViT-B-32 (random init: no network): open_clip's image tower with its
    own preprocessing settings, patched at the budget."""
    pytest.importorskip("open_clip")
    rows = evaluate.main(["--device", "cpu", "--model", "open_clip:ViT-B-32", "--out",
                          str(tmp_path), "--images", "2", "--probe-images", "0", "--budgets",
                          "0.7", "--methods", "tome", "--skip-speed", "--quiet", "--batch", "2"])
    assert [r["method"] for r in rows] == ["unreduced", "tome"]
    assert rows[1]["gflops"] <= 0.7 * rows[0]["gflops"]
    assert 0 < rows[1]["cls_cosine"] < 1
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["model"] == "open_clip:ViT-B-32 (random init)"
    assert written["preprocessing"] is None  # recorded only for --data
