"""bench/bench_model.py as a CPU dry run of the end-to-end benchmark, on a tiny timm ViT: every row
timed, FLOPs within the budget, and a zero-overhead bound that runs the patched default's token
schedule."""
import copy
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import timm
import torch

import tt_kernels
from tt_kernels import measure

_SPEC = importlib.util.spec_from_file_location(
    "bench_model", Path(__file__).resolve().parent.parent / "bench" / "bench_model.py")
bench_model = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_model)

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=96, depth=4)  # 37 tokens: the default and tome solve different schedules
BUDGET = 0.6
ARGV = ["--device", "cpu", "--models", NAME, "--model-kwargs", json.dumps(TINY),
        "--budget", str(BUDGET), "--repeats", "1", "--seconds", "0", "--warmup", "0",
        "--malloc", "default"]  # held memory is process-wide: pytest's malloc stays as it is


def _tiny():
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False, **TINY).eval()


def _tokens_per_block(model, x):
    """The output and the tokens each block returns, counted with forward hooks."""
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, out: counts.append(out.shape[1]))
             for b in model.blocks]
    with torch.no_grad():
        out = model(x)
    for hook in hooks:
        hook.remove()
    return out, counts


def _record(out_dir):
    (path,) = out_dir.glob(f"model-{NAME}-*.json")
    return json.loads(path.read_text())


def _default_schedule():
    patched = tt_kernels.patch(_tiny(), flops=BUDGET)
    with torch.no_grad():
        patched(torch.randn(1, 3, 96, 96))
    return patched.token_reduction.schedule


def test_every_row_at_every_batch(tmp_path):
    bench_model.main(ARGV + ["--batch", "1,2", "--out-dir", str(tmp_path)])
    record = _record(tmp_path)
    n0 = 37
    r_tome = bench_model.constant_r(_tiny(), n0, BUDGET)
    published = f"ToMe published patch (r={r_tome})"
    bound_of = {"tt_kernels default": "bound", "tt_kernels tome": "bound, tome's schedule",
                published: "bound, constant r"}
    reducing = list(bound_of)
    unreduced = ["timm eager", "bound, nothing removed", "tt_kernels r=0"]
    schedule = _default_schedule()
    assert sum(schedule) > 0  # the budget removes tokens, so the rows below differ
    assert record["cases"][0]["rows"]["tt_kernels tome"]["schedule"] != schedule  # told apart
    assert [case["batch"] for case in record["cases"]] == [1, 2]
    assert record["malloc"] == "default"
    for case in record["cases"]:
        rows = case["rows"]
        assert set(rows) == set(reducing + unreduced + list(bound_of.values()))
        for name, row in rows.items():
            assert row["status"] == "ok", (name, row)
            assert row["ms"] > 0 and math.isclose(row["images_per_s"],
                                                  case["batch"] / row["ms"] * 1e3)
            assert row["output_shape"] == [case["batch"], 1000] and row["turns"] == 1
            assert row["turn_ms"] == [row["ms"]]  # one turn: its time is the median
            faults = row["page_faults_per_turn"]
            assert faults is None if measure.page_faults() is None else faults >= 0
        assert rows["timm eager"]["speedup"] == 1.0
        for name in unreduced:
            assert rows[name]["flops_fraction"] == 1.0 and sum(rows[name]["schedule"]) == 0
        for name in reducing:  # met from below; ToMe's constant r lands coarser
            assert 0.5 < rows[name]["flops_fraction"] <= BUDGET, name
            # each held to the bound of the schedule it ran
            assert rows[name]["bound_row"] == bound_of[name] and rows[name]["of_bound"] > 0
            # one turn: its ratio is the ratio of the medians
            by_turn = rows[name]["of_bound_by_turn"]
            assert by_turn["q1"] == by_turn["median"] == by_turn["q3"] == by_turn["low"] == \
                by_turn["high"] and by_turn["coverage"] == 0  # one turn is no interval
            assert math.isclose(by_turn["median"], rows[name]["of_bound"], rel_tol=1e-12)
            assert rows[bound_of[name]]["schedule"] == rows[name]["schedule"], name
        assert rows["tt_kernels r=0"]["bound_row"] == "bound, nothing removed"
        assert rows["tt_kernels default"]["schedule"] == schedule
        assert rows[published]["schedule"] == bench_model.published_schedule(n0, r_tome,
                                                                             len(schedule))
        # the bound computes no similarity: below the default by that alone
        assert rows["bound"]["flops_fraction"] < rows["tt_kernels default"]["flops_fraction"]


def test_processes_give_each_statistic_over_separate_runs(tmp_path, capsys):
    """--processes 2: the benchmark runs twice, in two processes of its own; each row's time,
    speedup and turn-by-turn "of bound" are given over the two: their median (for two, the mean)
    and its interval (for two, their range, of coverage 1 - 2^(1 - 2) = 0.5)."""
    (returned,) = bench_model.main(ARGV + ["--batch", "1", "--repeats", "3", "--processes", "2",
                                           "--out-dir", str(tmp_path)])
    record = _record(tmp_path)
    assert record["processes"] == 2 and returned["processes"] == 2
    pids = {run["process_id"] for run in record["runs"]}
    assert len(pids) == 2 and os.getpid() not in pids
    (case,) = record["cases"]
    runs = [run["cases"][0]["rows"] for run in record["runs"]]
    statistics = {"ms_by_process": lambda row: row["ms"],
                  "speedup_by_process": lambda row: row["speedup"],
                  "of_bound_by_process": lambda row: row["of_bound_by_turn"]["median"]}
    held = {name for name, row in runs[0].items() if "bound_row" in row}
    assert len(held) == 4  # the three reducing rows and r=0
    for name, row in case["rows"].items():
        assert row["schedule"] == runs[0][name]["schedule"] == runs[1][name]["schedule"]
        given = [key for key in statistics if key in row]
        assert given == list(statistics)[:3 if name in held else 2], name
        for key in given:
            values = [statistics[key](run[name]) for run in runs]
            assert row[key]["processes"] == values
            assert math.isclose(row[key]["median"], sum(values) / 2, rel_tol=1e-12)
            assert (row[key]["low"], row[key]["high"]) == (min(values), max(values))
            assert row[key]["coverage"] == 0.5
    assert "process_id" not in record  # only each run's
    assert "medians over 2 processes" in capsys.readouterr().out
    changed = copy.deepcopy(record["runs"])
    changed[1]["cases"][0]["rows"]["bound"]["schedule"][0] += 1
    with pytest.raises(RuntimeError, match="bound ran other schedules in other processes"):
        bench_model.combine_processes(changed)


def test_bound_runs_the_default_token_counts():
    """Block by block, the bound keeps as many tokens as the patched default, and ends in the
    same output shape."""
    base, x = _tiny(), torch.randn(2, 3, 96, 96)
    patched = tt_kernels.patch(copy.deepcopy(base), flops=BUDGET)
    want, want_counts = _tokens_per_block(patched, x)
    bound = bench_model.zero_overhead_bound(copy.deepcopy(base), patched.token_reduction.schedule)
    got, got_counts = _tokens_per_block(bound, x)
    assert got_counts == want_counts and got.shape == want.shape
    assert want_counts[-1] < 37  # tokens did leave


def test_a_failing_row_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    def broken(model, r):
        def forward(x):
            raise RuntimeError("this row cannot run")
        model.forward = forward
        return model

    monkeypatch.setattr(bench_model, "tome_published", broken)
    bench_model.main(ARGV + ["--batch", "1", "--out-dir", str(tmp_path)])
    rows = _record(tmp_path)["cases"][0]["rows"]
    failed = [name for name, row in rows.items() if row["status"] != "ok"]
    assert len(failed) == 1 and failed[0].startswith("ToMe published patch")
    assert rows[failed[0]] == dict(status="error", error="RuntimeError: this row cannot run")
    assert all("ms" in row for name, row in rows.items() if name not in failed)


def test_the_bound_needs_one_r_per_block():
    with pytest.raises(ValueError, match="one r per block"):
        bench_model.zero_overhead_bound(_tiny(), [1, 2])


def test_weight_copies_times_the_model_and_every_copy():
    spec = importlib.util.spec_from_file_location(
        "bench_weight_copies", Path(__file__).resolve().parent.parent / "bench" /
        "bench_weight_copies.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ms = script.main(["--model", NAME, "--copies", "2", "--turns", "1", "--seconds", "0",
                      "--malloc", "default"])
    assert list(ms) == ["model", "deep copy 1", "deep copy 2", "same weights 1", "same weights 2"]
    assert all(t > 0 for t in ms.values())
