"""Proportional attention's three forms (tt_kernels.attention): the mask and the extra column give
the float64 spec softmax(q k^T * scale + log s) v to rounding, and a patched timm ViT runs the
same with either."""
import copy
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES
from test_precision import _assert_within_rounding
from timm.models.vision_transformer import Attention, VisionTransformer

import tt_kernels
from tt_kernels import attention

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv_size(B, H, N, head_dim, dtype, seed=0, device="cpu"):
    """q, k, v as timm makes them (views of one qkv tensor), logits spread over a few units (so
    that attention is peaked and the bias moves it), sizes of merged tokens, 1 to 5."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, head_dim, generator=g) * head_dim ** 0.25 * 1.3
    q, k, v = qkv.to(device, dtype).permute(2, 0, 3, 1, 4).unbind(0)
    size = torch.randint(1, 6, (B, N), generator=g).float().to(device)
    return q, k, v, size


def _mask_form(q, k, v, size):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention.size_bias(size, q.dtype))


def _column_form(q, k, v, size):
    q2, k2, v2, scale = attention.size_columns(q, k, v, size)
    return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :q.shape[-1]]


@pytest.mark.parametrize("head_dim", [64, 48, 13, 7])
@pytest.mark.parametrize("N", [197, 13])
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_and_mask_are_the_spec_to_rounding(dtype, N, head_dim):
    q, k, v, size = _qkv_size(2, 3, N, head_dim, dtype)
    want, bound = attention.reference(q, k, v, size), attention.error_bound(q, k, v, size)
    # the bias matters far beyond the bound, so a form that lost it fails
    assert ((attention.reference(q, k, v, None) - want).abs() > 10 * bound).any()
    mask, column = _mask_form(q, k, v, size), _column_form(q, k, v, size)
    assert mask.dtype == column.dtype == dtype and column.shape == q.shape
    assert ((mask.double() - want).abs() <= bound).all()  # each within the kernels' rounding
    assert ((column.double() - want).abs() <= bound).all()
    assert ((column.double() - mask.double()).abs() <= 2 * bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_size_bias_is_in_qs_dtype_and_aligned_off_the_cpu(dtype):
    size = torch.randint(1, 6, (3, 13)).float()
    bias = attention.size_bias(size, dtype)
    assert bias.dtype == dtype and bias.shape == (3, 1, 1, 13)  # no [B, H, N, N] anywhere
    assert torch.equal(bias[:, 0, 0], size.log().to(dtype))  # rounded once, to q's dtype
    assert bias.untyped_storage().nbytes() == 3 * 13 * bias.element_size()  # the CPU: no padding
    # off the CPU (here the meta device, which has CUDA's layout and no values): a view of a
    # buffer of 16 keys, every stride a multiple of 8
    padded = attention.size_bias(size.to("meta"), dtype)
    assert padded.dtype == dtype and padded.shape == (3, 1, 1, 13)
    assert padded.stride() == (16, 16, 16, 1)
    assert padded.untyped_storage().nbytes() == 3 * 16 * padded.element_size()
    q, k, v, _ = _qkv_size(3, 2, 13, 16, dtype)
    # SDPA takes a strided view of the bias as it takes the same bias contiguous
    strided = torch.zeros(3, 1, 1, 16, dtype=dtype)[..., :13].copy_(bias)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=strided),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    assert attention.size_bias(None, dtype) is None
    assert attention.size_bias(size[:0], dtype).shape == (0, 1, 1, 13)  # no images: no error


def test_size_columns_layout():
    q, k, v, size = _qkv_size(2, 3, 13, 64, torch.bfloat16)
    q2, k2, v2, scale = attention.size_columns(q, k, v, size)
    assert q2.shape == k2.shape == v2.shape == (2, 3, 13, 72)  # Dh + 1 padded to a multiple of 8
    assert scale == 0.125  # SDPA's default for Dh = 64, not for the padded 72
    assert torch.equal(q2[..., :64], q) and (q2[..., 64] == 8).all() and (q2[..., 65:] == 0).all()
    assert torch.equal(k2[..., 64], size.log().to(torch.bfloat16)[:, None].expand(2, 3, 13))
    assert (k2[..., 65:] == 0).all() and (v2[..., 64:] == 0).all()


def _model(**kw):
    torch.manual_seed(0)
    return VisionTransformer(**TINY, **kw).eval()


def _images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _recording_sdpa(monkeypatch):
    """Records (q, attn_mask, dropout_p, scale) of every SDPA call."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        calls.append((q, attn_mask, dropout_p, kwargs.get("scale")))
        return sdpa(q, k, v, attn_mask, dropout_p, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("form", attention.FORMS)
def test_nothing_to_remove_is_the_unpatched_model(form):
    model = _model()
    with torch.no_grad():
        want = model(_images())
        got = tt_kernels.patch(copy.deepcopy(model), r=0, attention=form)(_images())
    assert torch.equal(got, want)  # all sizes 1: no bias, timm's own forward


def test_patched_model_column_equals_mask(monkeypatch):
    calls = _recording_sdpa(monkeypatch)
    mask_model = tt_kernels.patch(_model(), flops=0.6, attention="mask")
    column_model = tt_kernels.patch(_model(), flops=0.6, attention="column")
    with torch.no_grad():
        want = mask_model(_images())
        masks, calls[:] = list(calls), []
        got = column_model(_images())
    assert column_model.token_reduction.schedule == mask_model.token_reduction.schedule
    assert sum(column_model.token_reduction.schedule) > 0
    # after the first step: the mask form passes a mask, the column form widens Dh 16 to 24
    assert [m is None for _, m, _, _ in masks] == [True, False, False, False]
    assert [(m is None, q.shape[-1]) for q, m, _, _ in calls] == [(True, 16)] + [(True, 24)] * 3
    # the same function in fp32, roundings apart (through four blocks and their token choices)
    _assert_within_rounding(got, want, torch.float32)
    assert torch.equal(column_model.token_reduction.size, mask_model.token_reduction.size)


@pytest.mark.parametrize("setup", ["autocast", "bf16-weights", "fp32"])
@pytest.mark.parametrize("form", ["mask", "auto"])
def test_the_mask_has_qs_dtype(form, setup, monkeypatch):
    """cuDNN misreads an fp32 mask beside half q (pytorch#191612); under autocast x stays fp32
    while q is bf16."""
    calls = _recording_sdpa(monkeypatch)
    model, x = tt_kernels.patch(_model(), r=6, attention=form), _images()
    if setup == "bf16-weights":
        model, x = model.bfloat16(), x.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                         enabled=setup == "autocast"):
        model(x)
    masked = [(q.dtype, m.dtype) for q, m, _, _ in calls if m is not None]
    want = torch.float32 if setup == "fp32" else torch.bfloat16
    assert masked == [(want, want)] * 3


def test_column_form_keeps_dropout_and_train_mode(monkeypatch):
    calls = _recording_sdpa(monkeypatch)
    model = tt_kernels.patch(_model(attn_drop_rate=0.25), r=6, attention="column").train()
    model(_images()).sum().backward()
    assert [p for _, _, p, _ in calls] == [0.25] * 4
    assert all(s == 0.25 for _, _, _, s in calls[1:])  # 1 / sqrt(16), passed explicitly
    model.eval()
    calls[:] = []
    with torch.no_grad():
        model(_images())
    assert [p for _, _, p, _ in calls] == [0.0] * 4


def _attention_variants():
    """timm Attention flavours this timm has (older ones lack gated / scale_norm)."""
    variants = {"plain": {}, "qk-norm": dict(qk_norm=True, norm_layer=torch.nn.LayerNorm),
                "scale-norm": dict(scale_norm=True, norm_layer=torch.nn.LayerNorm),
                "gated": dict(gated=True), "qkv-bias": dict(qkv_bias=True)}
    params = inspect.signature(Attention).parameters
    return {name: kw for name, kw in variants.items() if set(kw) <= set(params)}


@pytest.mark.parametrize("variant", _attention_variants())
def test_column_attention_is_timms_forward(variant):
    torch.manual_seed(0)
    attn = Attention(48, num_heads=3, **_attention_variants()[variant]).eval()
    for p in attn.parameters():  # LayerNorms' and biases' defaults would hide them
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 13, 48)
    size = torch.randint(1, 6, (2, 13)).float()
    with torch.no_grad():
        want = attn(x, attn_mask=attention.size_bias(size, x.dtype))
        got = attention.column_attention(attn, x, size)
    assert attention.column_supported(attn)
    _assert_within_rounding(got[None], want[None], torch.float32)


def test_unknown_attention_modules_get_the_mask():
    """The eager path (fused_attn=False) scales q itself and takes no scale, and a subclass may
    change the forward: both run their own forward with the mask."""
    class Custom(Attention):
        pass

    model = _model()
    model.blocks[1].attn.fused_attn = False
    custom = Custom(48, num_heads=3, qkv_bias=True)
    custom.load_state_dict(model.blocks[2].attn.state_dict())
    model.blocks[2].attn = custom.eval()
    assert [attention.column_supported(b.attn) for b in model.blocks] == [True, False, False, True]
    mask, column = (tt_kernels.patch(copy.deepcopy(model), r=6, attention=form)
                    for form in ("mask", "column"))
    with torch.no_grad():
        want, got = mask(_images()), column(_images())
    _assert_within_rounding(got, want, torch.float32)
    x, size = torch.randn(2, 13, 48), torch.randint(1, 6, (2, 13)).float()
    for block in model.blocks[1:3]:
        with torch.no_grad():
            assert torch.equal(attention.attend(block.attn, x, size, "column"),
                               attention.attend(block.attn, x, size, "mask"))


def test_auto_is_the_mask_on_the_cpu():
    x = torch.randn(2, 13, 48)
    assert attention.resolve("auto", x) == "mask"
    assert attention.resolve("auto", x.bfloat16()) == "mask"
    assert set(attention.CUDA_AUTO) == set(DTYPES) and set(attention.CUDA_AUTO.values()) <= \
        set(attention.FORMS) - {"auto"}


def test_cudnn_on_the_cpu_is_refused_by_name():
    model = tt_kernels.patch(_model(), r=6, attention="cudnn")
    with torch.no_grad(), pytest.raises(ValueError, match="attention='cudnn' is cuDNN's CUDA"):
        model(_images())


def test_the_setting_is_checked_at_patch_and_at_run_time(monkeypatch):
    message = r"`attention` must be one of \('auto', 'mask', 'column', 'cudnn'\), got 'flash'"
    model = _model()
    with pytest.raises(ValueError, match=message):
        tt_kernels.patch(model, r=6, attention="flash")
    assert not hasattr(model, "token_reduction")
    model = tt_kernels.patch(model, r=6)
    model.token_reduction.attention = "flash"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(_images())
    calls = _recording_sdpa(monkeypatch)
    for form, width in (("column", 24), ("mask", 16)):  # a change takes effect at the next forward
        model.token_reduction.attention, calls[:] = form, []
        with torch.no_grad():
            model(_images())
        assert [q.shape[-1] for q, _, _, _ in calls[1:]] == [width] * 3


def test_compile_fullgraph_column():
    model = tt_kernels.patch(_model(), flops=0.6, attention="column")
    with torch.no_grad():
        want = model(_images())
        got = torch.compile(model, fullgraph=True)(_images())
    _assert_within_rounding(got, want, torch.float32)


@CUDA
@pytest.mark.parametrize("form", ["column", "mask", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_forms_on_their_kernels(dtype, form):
    """On a GPU: the column runs on flash itself, the mask on the memory-efficient kernel and on
    cuDNN's, each within the spec's bound."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend, call = {"column": (SDPBackend.FLASH_ATTENTION, _column_form),
                     "mask": (SDPBackend.EFFICIENT_ATTENTION, _mask_form),
                     "cudnn": (SDPBackend.CUDNN_ATTENTION, _mask_form)}[form]
    q, k, v, size = _qkv_size(4, 6, 197, 64, dtype, device="cuda")
    with sdpa_kernel([backend]):
        got = call(q, k, v, size)
    want, bound = attention.reference(q, k, v, size), attention.error_bound(q, k, v, size)
    assert ((got.double() - want).abs() <= bound).all()


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_patched_model_auto_is_the_mask_to_rounding(dtype, monkeypatch):
    """auto on CUDA takes CUDA_AUTO's form, which gives the mask form's model to rounding."""
    calls = _recording_sdpa(monkeypatch)
    models = {form: tt_kernels.patch(_model(), r=6, attention=form).to("cuda", dtype)
              for form in ("mask", "auto")}
    with torch.no_grad():
        want = models["mask"](_images().to("cuda", dtype))
        calls[:] = []
        got = models["auto"](_images().to("cuda", dtype))
    width = 24 if attention.CUDA_AUTO[dtype] == "column" else 16
    assert [q.shape[-1] for q, _, _, _ in calls[1:]] == [width] * 3
    _assert_within_rounding(got, want, dtype)


def test_the_gpu_bench_dry_run(tmp_path):
    """bench/bench_attention.py --smoke: every form checked against the spec and timed, on the
    CPU, as the GPU run will (cuDNN, CUDA only, skipped)."""
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "bench/bench_attention.py", "--smoke", "--out-dir",
                          str(tmp_path)], cwd=root, env=dict(os.environ, PYTHONPATH=path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "attention-cpu-smoke.json").read_text())
    assert result["complete"] and not result["failures"] and len(result["cases"]) == 8
    for case in result["cases"]:
        assert case["forms"].pop("cudnn") == {"ms": None, "skipped": "CUDA only"}
        assert all(r["ok"] and r["ms"] > 0 for r in case["forms"].values())
