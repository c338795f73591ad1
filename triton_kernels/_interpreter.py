"""Triton 3.6's interpreter under NumPy >= 2.4: imported by every kernel module for its effect.

The interpreter holds each scalar kernel argument (N, D, ...) as a 1-element NumPy array, and
triton <= 3.6 turns it into a Python int for `range`/`tl.range` with `int(array)`, which NumPy 2.4
refuses for arrays of one dimension ("only 0-dimensional arrays can be converted to Python
scalars"), so every loop with a run-time bound fails (triton-lang/triton#9171). Triton 3.7 fixed
it by squeezing the array first; this applies that same fix to older interpreters. Compiled
kernels (a GPU) are not affected and nothing here touches them: the patch is installed only when
TRITON_INTERPRET=1 and triton is older than 3.7.
"""
import os


def _triton_before(major, minor):
    import triton

    try:
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:  # a development build: assume it is recent
        return False
    return version < (major, minor)


def _install():
    if os.environ.get("TRITON_INTERPRET") != "1" or not _triton_before(3, 7):
        return
    from triton.runtime import interpreter

    buggy = getattr(interpreter, "_patch_lang_tensor", None)
    if buggy is None or getattr(buggy, "tt_fixed", False):
        return

    def _patch_lang_tensor(tensor, scope):
        buggy(tensor, scope)
        # Set after the buggy one, so the scope restores both in reverse order when a launch ends.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor.tt_fixed = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


_install()
