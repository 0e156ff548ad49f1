"""Gradient clipping's sum of squares: lightning_smartmoe.clipping against the float64 copy it replaced.

Both run in this process on the same fp32 gradients (--tensors tensors of --elements elements in all, one CPU
thread), alternated --repeats times; each figure is the median. The baseline copies every gradient to float64,
squares and sums it (the strategy's clipping before 2026-12-07); `squared_norms` accumulates in float64 inside one
fused reduction per dtype. Also printed: the float32-accumulation alternative (`torch._foreach_norm` in float32),
which is faster still but not used, and each one's relative difference from the float64 copy.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/clipping.py                 (17.8M elements: the d_model 256 model)
      OMP_NUM_THREADS=1 .venv/bin/python bench/clipping.py --elements 4537088
Printed: a line per method, then one JSON object as the last line.
"""

import argparse
import json
import statistics
import time

import torch

from lightning_smartmoe.clipping import squared_norms


def float64_copy(grads: list[torch.Tensor]) -> torch.Tensor:
    """The baseline: every gradient copied to float64, squared and summed."""
    return sum((g.double().square().sum() for g in grads), torch.zeros((), dtype=torch.float64))


def float32_accumulation(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(grads, 2)).double().square().sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", type=int, default=17_825_792)
    ap.add_argument("--tensors", type=int, default=45)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    grads = [torch.randn(args.elements // args.tensors) for _ in range(args.tensors)]
    methods = {"float64_copy": float64_copy, "squared_norms": lambda g: squared_norms(g).sum(),
               "float32_accumulation": float32_accumulation}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    values = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            values[name] = fn(grads).item()
            seconds[name].append(time.perf_counter() - start)
    ref = values["float64_copy"]
    out = {"bench": "clipping", "elements": args.tensors * (args.elements // args.tensors), "tensors": args.tensors,
           "threads": 1, "repeats": args.repeats}
    for name in methods:
        ms, error = statistics.median(seconds[name]) * 1e3, abs(values[name] - ref) / ref
        print(f"{name:<21} {ms:8.2f} ms  relative difference {error:.1e}")
        out[name] = {"ms": round(ms, 3), "relative_difference": error}
    out["speedup"] = round(out["float64_copy"]["ms"] / out["squared_norms"]["ms"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
