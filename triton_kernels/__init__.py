"""Triton kernels of tt_kernels, installed as ``tt_kernels.triton_kernels``.

The kernels for the tt operators come with the Triton issue; until then this package only reports
whether Triton itself can be used here.
"""


def triton_version():
    """The importable Triton's version, or None."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
