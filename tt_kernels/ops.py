"""The one door to the operators ``torch.ops.tt.*``: every kernel they dispatch to is registered
here or by what this module loads.

Importing this module loads the compiled library (which registers the CPU and, when built, CUDA
kernels), registers the Triton kernels for CUDA tensors of the ops without a compiled CUDA kernel,
and adds what lives in Python: fake kernels, so that ``torch.compile(fullgraph=True)`` traces
through the ops with static shapes, and autograd for ``apply``, ``transform`` (in x) and
``untransform`` (in y). The C++ kernels copy non-contiguous inputs to contiguous ones.
"""
import torch

from . import _C  # noqa: F401  (loading it registers the kernels)
from . import reference, triton_kernels
from .rules import OPS

ops = torch.ops.tt


def _registered(key):
    return tuple(op for op in OPS
                 if torch._C._dispatch_has_kernel_for_dispatch_key(f"tt::{op}", key))


CPU_OPS = _registered("CPU")  # the compiled C++ CPU kernels
CUDA_CPP_OPS = _registered("CUDA")  # the compiled CUDA kernels, read before Triton's join below


def _register_triton_for_cuda():
    """CUDA tensors given to a torch.ops.tt op without a compiled CUDA kernel run the Triton one."""
    if triton_kernels.triton_version() is None:
        return
    for op in OPS:
        if op not in CUDA_CPP_OPS:
            torch.library.impl(f"tt::{op}", "CUDA")(
                lambda *args, _op=op, **kwargs: triton_kernels.kernel(_op)(*args, **kwargs))


_register_triton_for_cuda()


def _slots(method, k):
    return k if method == "spread" else 1


@torch.library.register_fake("tt::match")
def _(metric, score=None, size=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
      targets="all", prefix=1, cost="cosine"):
    ref = metric if metric is not None else score
    B, N = ref.shape[0], ref.shape[-2] if metric is not None else ref.shape[1]  # metric: N, D last
    K = _slots(method, k)
    return ref.new_empty(B, N, K, dtype=torch.long), ref.new_empty(B, N, K, dtype=torch.float32)


@torch.library.register_fake("tt::apply")
def _(x, size, dst, weight, n_out, mode="mean"):
    B, _, C = x.shape
    return x.new_empty(B, n_out, C), size.new_empty(B, n_out)


@torch.library.register_fake("tt::untransform")
def _(y, dst, weight):
    B, N, _ = dst.shape
    return y.new_empty(B, N, y.shape[-1])


@torch.library.register_fake("tt::transform")
def _(x, size, metric, score=None, r=0, method="spread", k=1, tau=0.1, alpha=0.0,
      targets="all", prefix=1, mode="mean", cost="cosine"):
    B, N, C = x.shape
    K = _slots(method, k)
    return (x.new_empty(B, N - r, C), size.new_empty(B, N - r),
            x.new_empty(B, N, K, dtype=torch.long), size.new_empty(B, N, K))


@torch.library.register_fake("tt::cls_attention")
def _(q, k, size=None, scale=None):
    B, _, N, _ = k.shape
    return k.new_empty(B, N, dtype=torch.float32)


# Gradients. With a_ij the share of input j in output row i, x' = A x, so dL/dx = A^T g.
# A^T is a gather from the rows each input token feeds: exactly untransform, rescaled per token.
# Mode "norm" rescales each row by a function of x: its gradient comes from the reference.
def _apply_backward(grad_out, x, size, dst, weight, size_out, mode):
    if mode == "norm":
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            out, _ = reference.apply(leaf, size, dst, weight, size_out.shape[1], "norm")
            return torch.autograd.grad(out, leaf, grad_out)[0]
    if mode == "mean":
        # a_ij = w_ij * size_j / size'_i
        grad_out = grad_out / torch.where(size_out > 0, size_out, 1.0)[..., None]
        per_token = weight.sum(-1) * size
    else:
        per_token = weight.sum(-1)
    return ops.untransform(grad_out, dst, weight) * per_token[..., None].to(grad_out.dtype)


def _save(ctx, x, size, dst, weight, size_out, mode):
    ctx.save_for_backward(x if mode == "norm" else None, size, dst, weight, size_out)
    ctx.mode = mode


def _apply_setup(ctx, inputs, output):
    x, size, dst, weight, n_out, mode = inputs
    _save(ctx, x, size, dst, weight, output[1], mode)


def _apply_grad(ctx, grad_x_out, grad_size_out):
    return (_apply_backward(grad_x_out, *ctx.saved_tensors, ctx.mode),) + (None,) * 5


def _transform_setup(ctx, inputs, output):
    _save(ctx, inputs[0], inputs[1], output[2], output[3], output[1], inputs[11])


def _transform_grad(ctx, grad_x_out, *unused):
    return (_apply_backward(grad_x_out, *ctx.saved_tensors, ctx.mode),) + (None,) * 12


def _untransform_setup(ctx, inputs, output):
    y, dst, weight = inputs
    ctx.save_for_backward(dst, weight)
    ctx.n_y = y.shape[1]


def _untransform_grad(ctx, grad):
    # x_full[j] = sum_k c_jk y[dst_jk] with c = w / sum_k w: the transpose is a plain "sum" apply.
    dst, weight = ctx.saved_tensors
    total = weight.sum(-1, keepdim=True)
    coef = torch.where(total > 0, weight / torch.where(total > 0, total, 1.0), 0.0)
    ones = torch.ones(dst.shape[:2], dtype=torch.float32, device=dst.device)
    grad_y, _ = ops.apply(grad, ones, dst, coef, ctx.n_y, "sum")
    return grad_y, None, None


# op -> (setup_context, backward): registered below, and reused by launchers outside the
# dispatcher (backends.py, Triton) so that every backend has the ops' gradients.
GRADIENTS = {"apply": (_apply_setup, _apply_grad), "transform": (_transform_setup, _transform_grad),
             "untransform": (_untransform_setup, _untransform_grad)}
for _op, (_setup, _backward) in GRADIENTS.items():
    torch.library.register_autograd(f"tt::{_op}", _backward, setup_context=_setup)


# T and the importance score are chosen, not computed smoothly: match and cls_attention have no
# gradient. Their kernels run below autograd and their outputs never require grad.
def _constant_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))
    ctx.n_inputs = len(inputs)


def _no_grad(ctx, *grads):
    return (None,) * ctx.n_inputs


for _op in ("match", "cls_attention"):
    torch.library.register_autograd(f"tt::{_op}", _no_grad, setup_context=_constant_setup)
