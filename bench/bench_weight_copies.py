"""Does a copy of a model run as fast as the model? Deep copies against copies sharing its weights.

bench_model.py times every row against the others in one process, each row a copy of one timm
model. This times that model unpatched, `--copies` deep copies of it and as many
measure.same_weights copies (own modules, the model's parameters and buffers), all in turns in one
process (tt_kernels.measure.time_forwards), and prints each one's speed as a fraction of the
model's: what a row's copy alone moves a ratio by.

    python bench/bench_weight_copies.py [--model deit_small_patch16_224] [--batch 1] [--copies 3]
"""
import argparse
import copy
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tt_kernels import measure  # noqa: E402
from tt_kernels.machine import cpu_model  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--turns", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="more turns than --turns where those take less than this")
    measure.add_malloc_argument(parser)
    args = parser.parse_args(argv)
    malloc = measure.use_malloc(args.malloc)
    base = timm.create_model(args.model, pretrained=False).eval()
    models = {"model": base}
    for i in range(1, args.copies + 1):
        models[f"deep copy {i}"] = copy.deepcopy(base)
    for i in range(1, args.copies + 1):
        models[f"same weights {i}"] = measure.same_weights(base)
    x = torch.randn(args.batch, 3, *base.patch_embed.img_size)
    times = measure.time_forwards(models, x, args.turns, seconds=args.seconds)
    ms = {name: t["median_ms"] for name, t in times.items()}
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads on {cpu_model()}, "
          f"{times['model']['samples']} turns, malloc {malloc}: speed as a fraction of the "
          "model's")
    for name, t in ms.items():
        print(f"  {name:16s} {t:8.2f} ms  {ms['model'] / t:.3f}")
    return ms


if __name__ == "__main__":
    main()
