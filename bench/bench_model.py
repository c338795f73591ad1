"""Whole-model speed, the end-to-end number users compare, on the CPU or a CUDA GPU.

Rows, all at the same FLOPs budget, for each model and batch size (speedup over unpatched timm
eager; every row's time in the same process, warm-up discarded, median of interleaved repeats:
each repeat runs every row once in turn, so drift hits all alike):
  timm eager                   unpatched timm (fused SDPA): the baseline
  tt_kernels default           tt_kernels.patch(flops=budget)
  tt_kernels tome              the same with method="tome"
  tt_kernels r=0               patched with nothing to remove (the patch's own cost)
  bound, nothing removed       unpatched timm again, a copy with its weights as every other row is:
                               r=0's bound (copies of one model differ by up to 1.5% at batch
                               1, more than r=0's cost: bench/bench_weight_copies.py)
  ToMe published patch         ToMe as its authors ship it for timm (eager attention with the size
                               bias, PyTorch merging; written here from the published algorithm),
                               one constant r meeting the budget
  bound                        the zero-overhead bound: the same model and the default's per-block
                               token schedule, each block dropping its last r tokens by slicing
                               (no similarity, no merge, no mask)
  bound, tome's schedule       the same for tome's schedule (its similarity is cheaper than the
  bound, constant r            default's: it meets the budget removing fewer tokens) and for the
                               published patch's constant r: each reducing row is held to the
                               bound of the schedule it runs
With --compile each row also runs under torch.compile(dynamic=False; fullgraph=True) and unpatched
timm under torch.compile(mode="reduce-overhead") (CUDA graphs; GPU only). A row that fails (a
compile error, a kernel that does not run on this device) records its error; the others go on.
Reducing rows also report their time as a fraction of their bound's in the same compile mode
("of bound": bound time / row time, of the medians), r=0 of the unpatched copy's, with that
fraction turn by turn ("by turn", tt_kernels.measure.ratio_by_turn): its median, printed with the
median's 95% interval (the JSON also holds the quartiles). Where a goal lies inside the interval,
the run does not settle it. The turn by turn median pairs each row with its bound in the same
turn, so a change of load between turns cancels; the interval counts the turns as independent, and
runs in separate processes can differ by more (bench/results/turns200 at 93df24d and at 0cf041f,
200 turns each). So --processes K runs the whole benchmark K times, each in a process of its
own, one after another, and gives each row's time, speedup and turn-by-turn "of bound" as the
median over the processes with that median's 95% interval, over independent runs (6 processes or
more reach 95%); the JSON keeps every process's record.
FLOPs fractions come from the exact counter
(tt_kernels.vit_flops) applied to the token counts each block actually ran with (forward hooks),
checked against the patched model's own token_reduction.schedule and schedule_flops.

    python bench/bench_model.py                                   # CPU here: batch 1,16, DeiT-S
    python bench/bench_model.py --device cuda --dtype bf16 --batch 1,64,256 --compile \\
        --models deit_small_patch16_224,deit_base_patch16_224,vit_small_patch14_dinov2

Timing: tt_kernels.measure.time_forwards, the rows in turns (--repeats of them, more where those
would take under --seconds): on the CPU one forward a turn (torch.utils.benchmark's Timer, after
the two forwards it discards); on CUDA, CUDA events around a few forwards per turn (enough for
~10 ms), synchronised, L2 not flushed (a served model's weights stay warm too). Inputs are random
normal images. Memory: with --malloc held (the default) glibc's malloc keeps what the process
frees (tt_kernels.measure.hold_freed_memory), so that no row pays page faults for memory handed
back to the kernel; --malloc default leaves malloc as it is. Each row records the minor page
faults of its turns (median; "faults/turn" in the table: a turn is Timer's three forwards on the
CPU). Writes one JSON per model to each --out-dir (default bench/results/):
model-<card>-<model>-<dtype>[-amp][-compile].json on a GPU (card from torch.cuda.get_device_name,
slugged), model-<model>-<cpu>-<cores>c.json on the CPU.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import timm
import torch
from torch._dynamo.utils import counters

import tt_kernels
from tt_kernels import measure
from tt_kernels.machine import device_info, machine_info, slug, versions

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = {  # per device: batches, repeats, seconds, warm-up forwards (CUDA graphs record
    # after 2). The CPU's turns vary by a few percent (other tenants; with --malloc default
    # also the allocator's state): on a 2-core Xeon at batch 16 a turn's ratio of a row to its
    # bound has quartiles 5 to 8% apart, and a median's 95% interval spans 0.016 to 0.045 in 50
    # turns (about 8 minutes at batch 16 there; the JSONs' turn_ms give it). At batch 1 a turn is
    # short: the turns fill 30 s (about 100).
    "cpu": dict(batch="1,16", repeats=50, seconds=30.0, warmup=2),
    "cuda": dict(batch="1,64,256", repeats=5, seconds=0.0, warmup=3),
}
BASELINE = "timm eager"


# ----------------------------------------------------------------------------- ToMe's own patch

def _tome_attention(self, x, size):
    """Eager attention with ToMe's proportional bias; also returns the keys' head mean."""
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    if size is not None:
        attn = attn + size.log()[:, None, None, :, 0]
    x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return self.proj(x), k.mean(1)


def _bipartite_merge(x, size, metric, r):
    """ToMe's bipartite soft matching with a class token, then the size-weighted merge."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0] = -math.inf
    node_max, node_idx = scores.max(-1)
    order = node_max.argsort(-1, descending=True)[..., None]
    unmerged, merged = order[:, r:], order[:, :r]
    dst_idx = node_idx[..., None].gather(1, merged)

    def merge(t):
        src, dst = t[:, ::2], t[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(1, unmerged.expand(n, t1 - r, c))
        src = src.gather(1, merged.expand(n, r, c))
        return torch.cat([unm, dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, "sum")], 1)

    x, size = merge(x * size), merge(size)
    return x / size, size


def tome_published(model, r):
    """ToMe's timm patch, in place: every block merges r tokens after its attention."""
    state = {"size": None}

    def block_forward(self, x, attn_mask=None, is_causal=False):
        attn_out, metric = _tome_attention(self.attn, self.norm1(x), state["size"])
        x = x + self.drop_path1(self.ls1(attn_out))
        size = state["size"] if state["size"] is not None else x.new_ones(*x.shape[:2], 1)
        n_r = _published_r(r, x.shape[1])
        if n_r > 0:
            x, state["size"] = _bipartite_merge(x, size, metric, n_r)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    original = model.forward_features

    def forward_features(self, x, *args, **kwargs):
        state["size"] = None
        return original(x, *args, **kwargs)

    for block in model.blocks:
        block.forward = types.MethodType(block_forward, block)
    model.forward_features = types.MethodType(forward_features, model)
    return model


def _published_r(r, n):
    """What ToMe's patch merges of n tokens when asked for r: at most half, the class token kept."""
    return max(min(r, (n - 1) // 2), 0)


def published_schedule(n0, r, depth):
    """The r each of `depth` blocks of tome_published(model, r) merges, from n0 tokens."""
    schedule = []
    for _ in range(depth):
        schedule.append(_published_r(r, n0 - sum(schedule)))
    return schedule


def constant_r(model, n0, budget):
    """ToMe's own convention: one r for every block (the smallest meeting the budget)."""
    def flops(r):
        return tt_kernels.vit_flops(model, n0, published_schedule(n0, r, len(model.blocks)))
    return next(r for r in range(n0) if flops(r) <= budget * flops(0))


# ----------------------------------------------------------------------------- the bound

def _drop_last_forward(self, x, attn_mask=None, is_causal=False):
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
    if self.bound_r:
        x = x[:, :x.shape[1] - self.bound_r]
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def zero_overhead_bound(model, schedule):
    """`model` (a timm ViT), in place, with block i dropping its last schedule[i] tokens between
    its attention and its MLP, where a patched block reduces: what any reduction with this
    schedule costs at the least."""
    if len(schedule) != len(model.blocks):
        raise ValueError(f"`schedule` must have one r per block ({len(model.blocks)}), "
                         f"got {schedule!r}")
    for block, r in zip(model.blocks, schedule):
        block.bound_r = r
        block.forward = types.MethodType(_drop_last_forward, block)
    return model


# ----------------------------------------------------------------------------- the rows

def token_counts(model, run, x):
    """(output, [(tokens entering, tokens leaving) per block]) of one forward `run(x)`."""
    counts = []
    hooks = [block.register_forward_hook(
        lambda module, inputs, output: counts.append((inputs[0].shape[1], output.shape[1])))
        for block in model.blocks]
    try:
        with torch.inference_mode():
            out = run(x)
    finally:
        for hook in hooks:
            hook.remove()
    return out, counts


def eager_models(base, budget, backend=None):
    """{row: (model, FLOPs counter keywords)}: every eager row, each a copy of `base` with its
    weights (measure.same_weights); the tt_kernels rows run `backend` (None: the package's
    default on the device)."""
    n0 = base.patch_embed.num_patches + base.num_prefix_tokens
    default = tt_kernels.patch(measure.same_weights(base), flops=budget, backend=backend)
    tome = tt_kernels.patch(measure.same_weights(base), flops=budget, method="tome",
                            backend=backend)
    r_tome = constant_r(base, n0, budget)

    def counted(m):
        tr = m.token_reduction
        return dict(prefix=tr.prefix, by_importance=tr.by_importance, method=tr.method,
                    metric_dim=tr.metric_dim(base))

    def bound(schedule):  # no similarity: FLOPs counted as for pruning, whose steps compute none
        return zero_overhead_bound(measure.same_weights(base), schedule), dict(method="prune")

    # each row next to the row it is held to (_bound_of): neighbours in a turn meet the most
    # nearly equal load, as the turns run in order and in reverse order
    return {
        BASELINE: (base, {}),
        "bound, nothing removed": (measure.same_weights(base), {}),
        "tt_kernels r=0": (tt_kernels.patch(measure.same_weights(base), r=0, backend=backend), {}),
        "tt_kernels default": (default, counted(default)),
        "bound": bound(default.token_reduction.schedule_for(n0)),
        "tt_kernels tome": (tome, counted(tome)),
        "bound, tome's schedule": bound(tome.token_reduction.schedule_for(n0)),
        f"ToMe published patch (r={r_tome})": (tome_published(measure.same_weights(base), r_tome),
                                                dict(method="tome")),
        "bound, constant r": bound(published_schedule(n0, r_tome, len(base.blocks))),
    }


def _runner(model, amp_dtype, device_type):
    if amp_dtype is None:
        return model

    def run(x):
        with torch.autocast(device_type, dtype=amp_dtype):
            return model(x)
    return run


def _error(exc):
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


# ----------------------------------------------------------------------------- one case

def compiled_name(name):
    return name.replace(" eager", "") + " compiled"


def _compiled_rows(eager):
    """{row: (eager row it compiles, torch.compile keywords)} for --compile, in the order they
    compile, so that a time budget spent early leaves the least telling ones out: the
    references and the default first."""
    first = [BASELINE, "tt_kernels default", "bound"]
    rows = {compiled_name(name): (name, dict(fullgraph=True)) for name in first}
    rows["timm CUDA graphs"] = (BASELINE, dict(fullgraph=True, mode="reduce-overhead"))
    rows.update((compiled_name(name), (name, dict(fullgraph=True)))
                for name in eager if name not in first)
    return rows


def run_case(eager, base, n0, args, batch, log, deadline):
    """Every row of one (model, batch): dict row -> result."""
    device, amp_dtype = args.device, args.amp_dtype
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, *base.patch_embed.img_size, generator=gen).to(
        device=device, dtype=args.input_dtype)
    full = tt_kernels.vit_flops(base, n0, [0] * len(base.blocks))
    results, fns = {}, {}
    candidates = {name: (model, None, counter) for name, (model, counter) in eager.items()}
    if args.compile:
        torch._dynamo.reset()  # each case compiles anew for its batch (dynamic=False)
        for name, (source, options) in _compiled_rows(eager).items():
            model, counter = eager[source]
            candidates[name] = (model, options, counter)
    for name, (model, options, counter) in candidates.items():
        if options is not None and options.get("mode") == "reduce-overhead" and \
                device.type != "cuda":
            results[name] = dict(status="skipped", reason="CUDA graphs need a CUDA device")
            continue
        if time.perf_counter() > deadline:
            results[name] = dict(status="skipped", reason="time budget")
            continue
        try:
            run = _runner(model, amp_dtype, device.type)
            out, counts = token_counts(model, run, x)  # eager: the token counts each block ran
            schedule = [n_in - n_out for n_in, n_out in counts]
            flops = tt_kernels.vit_flops(base, n0, schedule, **counter)
            tr = getattr(model, "token_reduction", None)
            if tr is not None and (tr.schedule != schedule or
                                   not math.isclose(tr.schedule_flops(base, n0), flops)):
                raise RuntimeError(f"token_reduction.schedule {tr.schedule} (FLOPs "
                                   f"{tr.schedule_flops(base, n0)}) is not what ran: {schedule} "
                                   f"({flops})")
            results[name] = dict(status="ok", schedule=schedule, tokens=[n for _, n in counts],
                                 flops_fraction=flops / full)
            if options is not None:
                started = time.perf_counter()
                skips = counters["inductor"]["cudagraph_skips"]
                run = _runner(torch.compile(model, dynamic=False, **options), amp_dtype,
                              device.type)
                with torch.inference_mode():
                    out = run(x)  # compiles now, so a failure is this row's alone
                results[name]["compile_s"] = time.perf_counter() - started
                if options.get("mode") == "reduce-overhead":  # inductor may decline, and say so
                    results[name]["cudagraph_skips"] = \
                        counters["inductor"]["cudagraph_skips"] - skips
                log(f"  compiled {name} in {results[name]['compile_s']:.1f} s")
            results[name]["output_shape"] = list(out.shape)
            fns[name] = run
        except Exception as exc:  # noqa: BLE001 - the row records why; the bench goes on
            results[name] = dict(status="error", error=_error(exc))
            log(f"  {name}: {results[name]['error']}")
    for name, row in results.items():  # each reducing row ran its bound's schedule
        bound_schedule = results.get(_bound_of(name) or "", {}).get("schedule")
        if "schedule" in row and bound_schedule not in (None, row["schedule"]):
            raise RuntimeError(f"{_bound_of(name)} ran {bound_schedule}, {name} "
                               f"{row['schedule']}")
    times = measure.time_forwards(fns, x, args.repeats, args.warmup, args.seconds)
    seconds = {name: t["median_ms"] / 1e3 for name, t in times.items()}
    for name, s in seconds.items():
        results[name].update(ms=s * 1e3, images_per_s=batch / s, turns=times[name]["samples"],
                             turn_ms=times[name]["times_ms"],  # for any statistic, later
                             page_faults_per_turn=times[name]["page_faults"])
        if device.type == "cuda":
            results[name]["forwards_per_turn"] = times[name]["calls_per_turn"]
    for name, row in results.items():
        if "ms" not in row:
            continue
        if BASELINE in seconds:
            row["speedup"] = seconds[BASELINE] / seconds[name]
        reference = _bound_of(name)
        if reference and reference in seconds:
            row["bound_row"] = reference
            row["of_bound"] = seconds[reference] / seconds[name]
            row["of_bound_by_turn"] = measure.ratio_by_turn(times[reference], times[name])
    return results


def _bound_of(name):
    """The row whose time is `name`'s zero-overhead bound: r=0's is unpatched timm in a copy as
    r=0's is (not the copy's luck against the original), a reducing row's the bound of its
    schedule, each in the same compile mode; None for the references themselves."""
    compiled = compiled_name if name.endswith(" compiled") else (lambda same: same)
    for row, bound in (("tt_kernels r=0", "bound, nothing removed"),
                       ("tt_kernels tome", "bound, tome's schedule"), ("tt_kernels", "bound"),
                       ("ToMe published patch", "bound, constant r")):
        if name.startswith(row):
            return compiled(bound)
    return None


# ----------------------------------------------------------------------------- output

def tt_backends(backend, device):
    """The backend each op of the patched rows resolves to (or why none can run)."""
    resolved = {}
    for op in ("transform", "cls_attention"):
        try:
            resolved[op] = tt_kernels.backends.resolve(op, backend, device)
        except ValueError as exc:
            resolved[op] = _error(exc)
    return resolved


def file_name(model_name, args, info):
    """model-<card>-<model>-<dtype>[-amp][-compile].json on a GPU, so that runs of other dtypes
    and modes sit beside each other; the CPU's name keeps its fp32 form."""
    if args.device.type == "cuda":
        mode = f"{args.dtype}{'-amp' if args.amp else ''}{'-compile' if args.compile else ''}"
        return f"model-{slug(torch.cuda.get_device_name(args.device))}-{model_name}-{mode}.json"
    return f"model-{model_name}-{slug(info['cpu_model']).split('-')[0]}-{info['usable_cpus']}c.json"


def case_table(results):
    lines = [f"  {'row':36s} {'ms':>9s} {'img/s':>9s} {'speedup':>8s} {'of bound':>8s} "
             f"{'by turn [95% interval]':>23s} {'FLOPs':>6s} {'faults/turn':>11s}"]
    for name, row in results.items():
        if "ms" not in row:
            lines.append(f"  {name:36s} {row['status']}: {row.get('reason', row.get('error'))}"
                         [:110])
            continue
        of_bound = f"{row['of_bound']:.3f}" if "of_bound" in row else "-"
        by_turn = row.get("of_bound_by_turn")
        spread = f"{by_turn['median']:.3f} [{by_turn['low']:.3f}-{by_turn['high']:.3f}]" \
            if by_turn else "-"
        faults = row.get("page_faults_per_turn")
        faults = "-" if faults is None else f"{faults:g}"
        lines.append(f"  {name:36s} {row['ms']:9.2f} {row['images_per_s']:9.1f} "
                     f"{row.get('speedup', float('nan')):7.2f}x {of_bound:>8s} {spread:>23s} "
                     f"{row['flops_fraction']:6.3f} {faults:>11s}")
    return "\n".join(lines)


def _cell(row):
    """A summary cell: speedup over timm eager (of bound); over processes, their medians, "of
    bound" turn by turn with its interval."""
    if "speedup_by_process" in row:
        of_bound = row.get("of_bound_by_process")
        return f"{row['speedup_by_process']['median']:.2f}x" + (
            f" ({of_bound['median']:.3f} [{of_bound['low']:.3f}-{of_bound['high']:.3f}])"
            if of_bound else "")
    if "speedup" in row:
        return f"{row['speedup']:.2f}x" + (f" ({row['of_bound']:.2f})" if "of_bound" in row
                                           else "")
    return row["status"]


def _images_per_s(case):
    row = case.get("rows", {}).get(BASELINE, {})
    if "ms_by_process" in row:
        return f"{case['batch'] / row['ms_by_process']['median'] * 1e3:.1f}"
    return f"{row['images_per_s']:.1f}" if "ms" in row else "-"


def summary(record):
    """One model's rows against its batches: speedup over timm eager (of bound); for a record
    of --processes, medians over the processes, of bound turn by turn with the interval of its
    median over the processes."""
    cases = record["cases"]
    names = list(dict.fromkeys(n for c in cases for n in c.get("rows", {})))
    cells = {name: [_cell(c["rows"][name]) if name in c.get("rows", {}) else c["status"]
                    for c in cases] for name in names}
    cells[f"{BASELINE} images/s"] = [_images_per_s(c) for c in cases]
    width = 2 + max(len(cell) for row in cells.values() for cell in row)
    if "processes" in record:
        coverage = measure.median_interval(range(record["processes"]))[2]
        what = (f"medians over {record['processes']} processes: speedup over timm eager (of "
                f"bound turn by turn [the median's interval, coverage {coverage:.3f}])")
    else:
        what = "speedup over timm eager (of bound)"
    lines = [f"== {record['model']} ({record['img_size']} px), {record['device']['type']} "
             f"{record['device'].get('name', record['machine']['cpu_model'])}, "
             f"{record['dtype']}{' amp' if record['amp'] else ''}, FLOPs budget "
             f"{record['budget']}, tt_kernels backend {record['tt_kernels_backend']['transform']}"
             f": {what} ==",
             f"{'row':36s}" + "".join(f"{'b=' + str(c['batch']):>{width}s}" for c in cases)]
    lines += [f"{name:36s}" + "".join(f"{cell:>{width}s}" for cell in row)
              for name, row in cells.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- processes

def over_processes(values):
    """A statistic's median over runs in separate processes, with that median's 95% interval
    (measure.median_interval: runs in separate processes are independent, as turns of one
    process need not be) and each run's value."""
    low, high, coverage = measure.median_interval(values)
    return {"median": statistics.median(values), "low": low, "high": high,
            "coverage": coverage, "processes": list(values)}


def combine_processes(runs):
    """One model's record from its runs in separate processes (records of main, in run order):
    the first's settings, every run under "runs", and for each case and row that ran in every
    process, the row's time, its speedup and its "of bound" turn by turn (the turn-by-turn
    median), each over the processes (over_processes). A row's schedule is the same in every
    process, or this raises."""
    record = {key: value for key, value in runs[0].items()
              if key not in ("cases", "elapsed_s", "process_id")}
    record.update(processes=len(runs), runs=runs, cases=[])
    for cases in zip(*(run["cases"] for run in runs)):
        if any(case["status"] != "done" for case in cases):
            record["cases"].append(dict(batch=cases[0]["batch"], status="skipped",
                                        reason="not timed in every process"))
            continue
        rows = {}
        for name, first in cases[0]["rows"].items():
            each = [case["rows"][name] for case in cases]
            if not all("ms" in row for row in each):
                rows[name] = next(row for row in each if "ms" not in row)  # its status and why
                continue
            if any(row["schedule"] != first["schedule"] for row in each):
                raise RuntimeError(f"{name} ran other schedules in other processes: "
                                   f"{[row['schedule'] for row in each]}")
            rows[name] = dict(status="ok", schedule=first["schedule"],
                              flops_fraction=first["flops_fraction"],
                              ms_by_process=over_processes([row["ms"] for row in each]))
            if "speedup" in first:
                rows[name]["speedup_by_process"] = over_processes([row["speedup"]
                                                                   for row in each])
            if "of_bound_by_turn" in first:
                rows[name]["bound_row"] = first["bound_row"]
                rows[name]["of_bound_by_process"] = over_processes(
                    [row["of_bound_by_turn"]["median"] for row in each])
        record["cases"].append(dict(batch=cases[0]["batch"], status="done", rows=rows))
    return record


def in_processes(argv, args):
    """--processes K: this script with the same arguments in K processes, one after another, each
    writing its JSONs to a folder of its own (a failed process raises CalledProcessError); then,
    per model, combine_processes of its K records, written to the --out-dir folders and printed as
    summary tables."""
    started = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(tmp) / f"process-{i}" for i in range(args.processes)]
        for i, folder in enumerate(folders):
            print(f"[bench_model] process {i + 1} of {args.processes}", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv,
                            "--processes", "1", "--process-dir", str(folder)], check=True)
        for path in sorted(folders[0].glob("*.json")):
            record = combine_processes([json.loads((f / path.name).read_text()) for f in folders])
            write(record, [Path(d) / path.name for d in args.out_dir or [HERE / "results"]],
                  started)
            records.append(record)
    print()
    for record in records:
        print(summary(record))
    print(f"bench_model: {args.processes} processes, {time.perf_counter() - started:.1f} s in all")
    return records


# ----------------------------------------------------------------------------- main

def write(record, paths, started):
    record["elapsed_s"] = time.perf_counter() - started
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--amp", action="store_true",
                   help="autocast to --dtype with fp32 weights, instead of casting the weights")
    p.add_argument("--batch", default=None,
                   help="comma list of batch sizes (default: cpu 1,16; cuda 1,64,256)")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile rows (and CUDA graphs on a GPU)")
    p.add_argument("--models", default="deit_small_patch16_224", help="comma list of timm names")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size instead of each model's default")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help="JSON of further timm.create_model keywords, e.g. '{\"depth\": 4}'")
    p.add_argument("--budget", type=float, default=0.6, help="FLOPs fraction of the unreduced")
    p.add_argument("--backend", default=None, choices=tt_kernels.backends.BACKENDS,
                   help="tt_kernels backend of the patched rows (default: the package's default "
                        "on the device; on CUDA the reference until the kernels are verified)")
    p.add_argument("--repeats", type=int, default=None, help="timed turns (cpu 50, cuda 5)")
    p.add_argument("--seconds", type=float, default=None,
                   help="more turns than --repeats where those take less than this (cpu 30, "
                        "cuda 0)")
    p.add_argument("--warmup", type=int, default=None, help="forwards discarded (cpu 2, cuda 3)")
    measure.add_malloc_argument(p)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; rows and cases left when it is spent are recorded as skipped")
    p.add_argument("--out-dir", action="append", default=None,
                   help="folder for the JSON files (repeatable; default bench/results)")
    p.add_argument("--processes", type=int, default=1,
                   help="run the benchmark this many times, each in a process of its own, one "
                        "after another (each with the whole --time-budget), and give each "
                        "ratio's median over the processes with its interval (95%% from 6 "
                        "processes; default 1: this process only)")
    p.add_argument("--process-dir", default=None, help=argparse.SUPPRESS)  # one of --processes
    args = p.parse_args(argv)
    defaults = DEFAULTS[args.device]
    args.batches = [int(b) for b in (args.batch or defaults["batch"]).split(",")]
    args.repeats = defaults["repeats"] if args.repeats is None else args.repeats
    args.seconds = defaults["seconds"] if args.seconds is None else args.seconds
    args.warmup = defaults["warmup"] if args.warmup is None else args.warmup
    args.models = args.models.split(",")
    if args.amp and args.dtype == "fp32":
        p.error("--amp autocasts to a lower precision: give --dtype bf16 or fp16")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if min(args.batches) < 1 or args.repeats < 1 or args.processes < 1 or args.warmup < 0 or \
            args.seconds < 0:
        p.error("--batch, --repeats and --processes must be >= 1, --warmup and --seconds >= 0")
    args.device = torch.device(args.device)
    args.amp_dtype = DTYPES[args.dtype] if args.amp else None
    args.weight_dtype = torch.float32 if args.amp else DTYPES[args.dtype]
    args.input_dtype = args.weight_dtype
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.processes > 1:
        return in_processes(argv, args)
    started = time.perf_counter()
    deadline = started + args.time_budget if args.time_budget is not None else math.inf

    def log(text):
        print(f"[bench_model +{time.perf_counter() - started:.1f}s] {text}", flush=True)

    if args.compile:
        # every compiled row of a case enters VisionTransformer.forward: more entries than the
        # default 8, and past the limit dynamo would silently run eager
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    args.malloc = measure.use_malloc(args.malloc)
    info = machine_info()
    out_dirs = [Path(args.process_dir)] if args.process_dir else \
        [Path(d) for d in args.out_dir or [HERE / "results"]]
    records = []
    for model_name in args.models:
        torch.manual_seed(0)
        kwargs = dict(args.model_kwargs, **({"img_size": args.img_size} if args.img_size else {}))
        base = timm.create_model(model_name, pretrained=False, **kwargs).eval()
        n0 = base.patch_embed.num_patches + base.num_prefix_tokens
        eager = eager_models(base, args.budget, args.backend)
        for model, _ in eager.values():
            model.to(device=args.device, dtype=args.weight_dtype)
        record = {"model": model_name, "model_kwargs": kwargs,
                  "img_size": list(base.patch_embed.img_size), "tokens": n0,
                  "depth": len(base.blocks), "device": device_info(args.device),
                  "versions": versions(), "dtype": args.dtype, "amp": args.amp,
                  "compile": args.compile, "budget": args.budget, "repeats": args.repeats,
                  "seconds": args.seconds,
                  "tt_kernels_backend": tt_backends(args.backend, args.device),
                  "warmup": args.warmup, "malloc": args.malloc,
                  "timing": "CUDA events, median of interleaved turns" if
                  args.device.type == "cuda" else
                  "torch.utils.benchmark.Timer, median of interleaved turns",
                  "machine": info, "process_id": os.getpid(), "cases": []}
        paths = [d / file_name(model_name, args, info) for d in out_dirs]
        for batch in args.batches:
            if time.perf_counter() > deadline:
                record["cases"].append(dict(batch=batch, status="skipped", reason="time budget"))
                log(f"{model_name} batch {batch}: skipped (time budget)")
                write(record, paths, started)
                continue
            log(f"{model_name} batch {batch}: building, compiling and timing")
            load = os.getloadavg()[0]
            results = run_case(eager, base, n0, args, batch, log, deadline)
            # other work on the machine shows in the times: the 1-minute load before and after
            record["cases"].append(dict(batch=batch, status="done", rows=results,
                                        load_average=[load, os.getloadavg()[0]]))
            log(f"{model_name} batch {batch} {args.dtype}{' amp' if args.amp else ''} (load "
                f"average {load:.1f} -> {os.getloadavg()[0]:.1f}):\n"
                f"{case_table(results)}")
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            write(record, paths, started)  # after every case: a run cut short keeps its cases
        log(f"wrote {', '.join(map(str, paths))}")
        records.append(record)
        del eager, base
    print()
    for record in records:
        print(summary(record))
    print(f"bench_model: {time.perf_counter() - started:.1f} s in all")
    return records


if __name__ == "__main__":
    main()
