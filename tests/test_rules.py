"""The rules every layer shares are the same in C++ (csrc/tt.h, which the C++ CPU and CUDA kernels
and the argument checks read) and in Python (tt_kernels/rules.py, which the reference, the Triton
kernels, max_r and the FLOPs counter read). The host build of the CUDA code (tests/cuda_on_host)
exposes tt.h's rules as tt_host.rules."""
import pytest
import torch

from conftest import cuda_kernels_on_host
from tt_kernels import rules

METHODS = ["prune", "evit", "tome", "spread"]
# Every small case (odd and even n and prefix, r up to n) and ViT token counts.
TOKENS = [*range(0, 12), 196, 197, 257, 577]


def test_epsilons_are_pythons_in_fp32():
    """The C++ kernels compute in fp32: their epsilons are Python's, rounded to fp32 (and nonzero
    there)."""
    norm_eps, score_eps, *_ = cuda_kernels_on_host().rules("tome", 3, 0, 1, False)
    assert norm_eps == torch.tensor(rules.NORM_EPS, dtype=torch.float32).item() > 0
    assert score_eps == torch.tensor(rules.SCORE_EPS, dtype=torch.float32).item() > 0


@pytest.mark.parametrize("method", METHODS)
def test_token_counts_are_pythons(method):
    host = cuda_kernels_on_host()
    differ = []
    for n in TOKENS:
        for prefix in sorted({*range(0, min(n, 6) + 1), n}):
            for by_importance in (False, True):
                r_max = rules.max_r(method, n, prefix, by_importance)
                for r in sorted({*range(0, min(r_max, 9) + 1), r_max}):
                    want = (rules.first_a(prefix), rules.a_count(n, prefix), r_max,
                            rules.n_keep(method, n, r, prefix))
                    got = tuple(host.rules(method, n, r, prefix, by_importance)[2:])
                    if got != want:
                        differ.append((n, prefix, by_importance, r, got, want))
    assert not differ, differ[:5]
