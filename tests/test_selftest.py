"""python -m tt_kernels.selftest: the cases it runs pass with correct kernels and fail with wrong
ones, and its verdicts decide the default backend on CUDA tensors (verdicts.py)."""
import json

import pytest
import torch

from tt_kernels import backends, selftest, verdicts

TINY = {"tiny-37": selftest.QUICK["tiny-37"]}
CPU = torch.device("cpu")


TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # else interpreted


def _triton(op):
    return backends.implementation(op, "triton", TRITON_DEVICE)


def test_every_op_construction_and_dtype_is_a_case():
    cases = list(selftest.cases(TINY, selftest.DTYPES, CPU))
    names = [name for name, _, _ in cases]
    assert len(names) == len(set(names))
    n_constructions = len(selftest.CONSTRUCTIONS)
    # per dtype and batch: match + transform per construction, 3 apply modes, untransform,
    # cls_attention; batches 1 and 4
    assert len(cases) == len(selftest.DTYPES) * 2 * (2 * n_constructions + 5)
    assert {op for _, op, _ in cases} == set(backends.OPS)


@pytest.mark.skipif(not backends.supported("triton"), reason="needs triton")
def test_triton_kernels_pass():
    results = selftest.run({"triton": _triton}, TINY, (torch.bfloat16,), TRITON_DEVICE)["triton"]
    assert results["passed"], results["failed"]
    assert results["cases"] == 2 * (2 * len(selftest.CONSTRUCTIONS) + 5)


def test_a_wrong_kernel_fails_and_says_what():
    def wrong(op):
        run = backends.implementation(op, "cpu", CPU)
        if op != "transform":
            return run

        def perturbed(*args):
            x, size, dst, weight = run(*args)
            return x, size, dst, weight * 1.001  # one part in 1000: far above the bounds

        return perturbed

    def broken(op):
        def fail(*args):
            raise RuntimeError("no kernel image is available")
        return fail

    results = selftest.run({"wrong": wrong, "broken": broken}, TINY, (torch.float32,), CPU)
    failed = {f["case"] for f in results["wrong"]["failed"]}
    # prune's weights are 0 or 1 and tome's 1 (k = 1 merges whole): 1.001 is wrong everywhere a
    # weight is non-zero, so every transform case fails and nothing else does.
    assert failed == {f"transform-{c}-tiny-37-B{B}-float32" for c in selftest.CONSTRUCTIONS
                      for B in (1, 4)}
    assert all(f["weight_max_diff"] > 1e-4 for f in results["wrong"]["failed"])
    assert not results["broken"]["passed"]
    assert results["broken"]["cases"] == len(results["broken"]["failed"])
    assert "no kernel image" in results["broken"]["failed"][0]["error"]


def test_out_of_time_is_not_a_pass():
    cpu = lambda op: backends.implementation(op, "cpu", CPU)  # noqa: E731
    results = selftest.run({"cpu": cpu}, TINY, (torch.float32,), CPU, time_budget=0)["cpu"]
    assert not results["passed"] and results["cases"] == 0 and not results["failed"]
    assert results["skipped"] == 2 * (2 * len(selftest.CONSTRUCTIONS) + 5)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A CUDA device 0 with a fixed fingerprint and an empty verdict cache."""
    monkeypatch.setenv("TT_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    fingerprint = {"device": "Test GPU", "capability": "9.0", "driver": "13.0",
                   "torch": torch.__version__, "triton": None, "build": verdicts.build_id()}
    monkeypatch.setattr(verdicts, "fingerprint", lambda device: fingerprint)
    verdicts.verdict.cache_clear()
    yield fingerprint
    verdicts.verdict.cache_clear()


def test_no_verdict_keeps_the_reference(fake_gpu):
    assert verdicts.evidence("cuda", torch.device("cuda")) == (
        False, "not verified on this GPU: run python -m tt_kernels.selftest")
    assert backends.default_backend("transform", torch.device("cuda")) == "reference"


@pytest.mark.skipif(not backends.CUDA_CPP_OPS, reason="built without the CUDA kernels")
def test_a_recorded_pass_makes_the_backend_the_default(fake_gpu, tmp_path):
    path = verdicts.record(fake_gpu, {"cuda": {"passed": True, "cases": 3}})
    assert path == tmp_path / "selftest.json"
    verified, evidence = verdicts.evidence("cuda", torch.device("cuda"))
    assert verified and "self-test passed" in evidence and str(path) in evidence
    assert backends.default_backend("transform", torch.device("cuda", 0)) == "cuda"
    # another backend's verdict on this GPU is kept beside it
    verdicts.record(fake_gpu, {"triton": {"passed": False, "cases": 3}})
    assert verdicts.evidence("cuda", torch.device("cuda"))[0]
    assert not verdicts.evidence("triton", torch.device("cuda"))[0]
    # another GPU (or driver, torch, build) has no verdict
    other = dict(fake_gpu, device="Other GPU")
    verdicts.record(other, {"cuda": {"passed": False}})
    assert len(json.loads(path.read_text())) == 2
    assert backends.default_backend("transform", torch.device("cuda")) == "cuda"


def test_a_recorded_failure_overrides_the_projects_run(fake_gpu, monkeypatch):
    monkeypatch.setitem(verdicts.VERIFIED_ON_GPU, "triton", "H200, 2026-12-01, commit abc")
    assert verdicts.evidence("triton", torch.device("cuda")) == (
        True, "the project's GPU run: H200, 2026-12-01, commit abc")
    verdicts.record(fake_gpu, {"triton": {"passed": False, "cases": 3}})
    verified, evidence = verdicts.evidence("triton", torch.device("cuda"))
    assert not verified and "self-test FAILED" in evidence


def test_a_cpu_machine_reports_only_the_projects_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = backends.build_info()["verified_on_gpu"]
    assert set(info) == set(verdicts.BACKENDS)
    for name, v in info.items():
        assert v["verified"] == bool(verdicts.VERIFIED_ON_GPU[name])


def test_main_without_a_gpu_backend_says_so(capsys, monkeypatch):
    monkeypatch.setattr(selftest, "gpu_backends", lambda device: [])
    assert selftest.main(["--device", "cpu"]) == 2
    assert "no GPU backend" in capsys.readouterr().out


def test_cuda_kernels_pass_on_the_host():
    """The self-test's cases with the CUDA kernels' per-image code on the CPU (the host build):
    a dry run of what `python -m tt_kernels.selftest` checks on a GPU."""
    from conftest import host_ops

    host = host_ops()
    results = selftest.run({"cuda-on-host": lambda op: getattr(host, op)}, TINY,
                           (torch.float16,), CPU)["cuda-on-host"]
    assert results["passed"], results["failed"]
    assert results["cases"] == 2 * (2 * len(selftest.CONSTRUCTIONS) + 5)
