"""Each Triton kernel against its torch reference: values and gradients, uneven and empty groups, dropped
assignments, fp32 and bf16, and the whole MoELayer with MOE_KERNELS=triton against MOE_KERNELS=torch.

The cases run on any device: on CPU in Triton's interpreter (tests/test_triton_kernels.py starts this file in a
process with TRITON_INTERPRET=1, which must be set before triton is imported), on CUDA from bench/gpu.py.

    python tests/kernel_cases.py [--device cpu|cuda] [--only NAME ...]

prints one JSON object as its last line: {case name: {"ok": bool, "error": str, "seconds": float}}.
"""

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_smartmoe.moe import MoEConfig, MoELayer  # noqa: E402
from triton_ops.grouped_mm import grouped_mm_reference  # noqa: E402
from triton_ops.histogram import expert_histogram_reference  # noqa: E402
from triton_ops.permute import permute_reference, unpermute_reference  # noqa: E402
from triton_ops.topk_gating import topk_softmax_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def tolerance(dtype: torch.dtype) -> dict:
    """assert_close bounds for a kernel against its reference (summation order and bf16 rounding differ)."""
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """`got` matches `want` within the dtype's bounds, relative to want's largest magnitude."""
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    tol = tolerance(dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}")


def grads(outputs: list[torch.Tensor], inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Gradients of sum(<output, fixed random weights>) w.r.t. inputs."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float32).to(o.device, o.dtype) for o in outputs]
    return list(torch.autograd.grad(outputs, inputs, weights, allow_unused=True))


def slot_ids(tokens: int, k: int, slots: int, device, empty_slot: int | None, drop_every: int) -> torch.Tensor:
    """[tokens, k] distinct random slots per token, never `empty_slot`, and every `drop_every`-th assignment -1."""
    g = torch.Generator().manual_seed(tokens * 31 + slots)
    allowed = torch.tensor([s for s in range(slots) if s != empty_slot])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(tokens)])
    flat = ids.reshape(-1)
    flat[::drop_every] = -1
    return flat.view(tokens, k).to(device)


def case_router(device, dtype, renormalize: bool, k: int) -> None:
    from triton_ops.kernels.router import topk_softmax_triton

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 10, generator=g, dtype=dtype)).to(device).requires_grad_(True)
    got = topk_softmax_triton(logits, k, renormalize)
    want = topk_softmax_reference(logits, k, renormalize)
    assert torch.equal(got[2], want[2]), "expert ids differ"
    for name, a, b in zip(("probs", "weights", "lse"), (got[0], got[1], got[3]), (want[0], want[1], want[3])):
        close(a, b, dtype, name)
    differentiable = lambda out: [out[0], out[1], out[3]]  # noqa: E731
    for a, b in zip(grads(differentiable(got), [logits], 1), grads(differentiable(want), [logits], 1)):
        close(a, b, dtype, "d logits")


def case_histogram(device, dtype) -> None:
    from triton_ops.kernels.histogram import expert_histogram_triton

    g = torch.Generator().manual_seed(0)
    for n, bins in ((0, 3), (1500, 5), (97, 64), (40, 1)):
        ids = torch.randint(-1, bins, (n,), generator=g)
        ids[ids == bins // 2] = -1  # an empty bin
        ids = ids.to(device)
        for a, b, name in zip(expert_histogram_triton(ids, bins), expert_histogram_reference(ids, bins), ("counts", "offsets")):
            assert torch.equal(a, b), f"{name} n={n} bins={bins}: {a.tolist()} vs {b.tolist()}"


def case_permute(device, dtype) -> None:
    from triton_ops.kernels.permute import permute_triton

    for tokens, k, slots, drop_every in ((45, 2, 6, 5), (130, 1, 3, 7), (9, 3, 8, 1)):  # the last drops everything
        ids = slot_ids(tokens, k, slots, device, empty_slot=1, drop_every=drop_every)
        x = torch.randn(tokens, 40, generator=torch.Generator().manual_seed(tokens)).to(device, dtype).requires_grad_(True)
        got, want = permute_triton(x, ids, slots), permute_reference(x, ids, slots)
        assert torch.equal(got[1], want[1]), "order differs"
        assert torch.equal(got[2], want[2]), "counts differ"
        assert torch.equal(got[0], want[0]), "rows differ (a gather must be exact)"
        close(grads([got[0]], [x], 2)[0], grads([want[0]], [x], 2)[0], dtype, "d x")


def case_unpermute(device, dtype) -> None:
    from triton_ops.kernels.permute import unpermute_triton

    for tokens, k, slots, drop_every in ((45, 2, 6, 5), (130, 1, 3, 7), (9, 3, 8, 1)):
        ids = slot_ids(tokens, k, slots, device, empty_slot=1, drop_every=drop_every)
        x = torch.randn(tokens, 40, generator=torch.Generator().manual_seed(tokens)).to(device, dtype)
        _, order, _ = permute_reference(x, ids, slots)
        rows = torch.randn(order.numel(), 40, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        rows = rows.requires_grad_(True)
        weights = torch.rand(tokens, k, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_(True)
        got = unpermute_triton(rows, order, weights, tokens)
        want = unpermute_reference(rows, order, weights, tokens)
        close(got, want, dtype, "out")
        for a, b, name in zip(grads([got], [rows, weights], 3), grads([want], [rows, weights], 3), ("d rows", "d weights")):
            close(a, b, dtype, name)
        sent = int((order >= 0).sum())  # what the expert-parallel dispatcher passes: the kept rows only
        close(unpermute_triton(rows[:sent], order[:sent], weights, tokens), want, dtype, "out of kept rows")


def case_grouped_mm(device, dtype) -> None:
    from triton_ops.kernels.grouped_gemm import grouped_mm_triton

    for counts, d, h, tail in (([7, 0, 20, 3], 24, 40, 5), ([0, 0, 33], 16, 16, 0), ([1, 50, 2, 0, 17], 40, 24, 0)):
        g = torch.Generator().manual_seed(sum(counts) + d)
        x = torch.randn(sum(counts) + tail, d, generator=g).to(device, dtype).requires_grad_(True)
        w = torch.randn(len(counts), d, h, generator=g).to(device, dtype).requires_grad_(True)
        c = torch.tensor(counts, device=device)
        got, want = grouped_mm_triton(x, w, c), grouped_mm_reference(x, w, c)
        close(got, want, dtype, f"y {counts}")
        assert not got[sum(counts):].any(), "rows past the groups must be zero"
        (gx, gw), (want_gx, want_gw) = grads([got], [x, w], 4), grads([want], [x, w], 4)
        close(gx, want_gx, dtype, "d x")
        close(gw, want_gw, dtype, "d w")
        assert not gx[sum(counts):].any(), "rows past the groups must get zero gradient"
        assert all(not gw[e].any() for e, n in enumerate(counts) if n == 0), "an empty group's weight gradient must be zero"


def case_layer(device, dtype, gate: str, capacity: float | None) -> None:
    """MoELayer forward + backward under MOE_KERNELS=triton equals MOE_KERNELS=torch (dtype: bf16 = bf16 autocast)."""
    k = {"switch": 1}.get(gate, 2)
    cfg = MoEConfig(num_experts=6, top_k=k, gate=gate, capacity_factor=capacity, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    torch.manual_seed(0)
    layer = MoELayer(16, 32, cfg).to(device).train()
    x = torch.randn(2, 12, 16, device=device, requires_grad=True)
    results = {}
    saved = os.environ.get("MOE_KERNELS")
    try:
        for kernels in ("torch", "triton"):
            os.environ["MOE_KERNELS"] = kernels
            torch.manual_seed(1)  # the same random draws (switch jitter, gshard second expert)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y, aux = layer(x)
            params = list(layer.parameters())
            results[kernels] = [y, aux, layer.stats.expert_load, layer.stats.dropped] + grads([y, aux], [x, *params], 5)
    finally:
        if saved is None:
            os.environ.pop("MOE_KERNELS", None)
        else:
            os.environ["MOE_KERNELS"] = saved
    names = ["y", "aux", "expert_load", "dropped", "d x"] + [f"d {n}" for n, _ in layer.named_parameters()]
    assert int(results["torch"][3]) > 0 or capacity is None, "the case should drop assignments"
    for name, a, b in zip(names, results["triton"], results["torch"]):
        close(a, b, dtype, name)


CASES = {
    **{f"router_{dt}_k{k}{'_renorm' if r else ''}": (lambda d, dt=dt, r=r, k=k: case_router(d, DTYPES[dt], r, k))
       for dt in ("fp32", "fp64") for r in (True, False) for k in (1, 3)},
    "histogram": lambda d: case_histogram(d, None),
    **{f"permute_{dt}": (lambda d, dt=dt: case_permute(d, DTYPES[dt])) for dt in ("fp32", "bf16")},
    **{f"unpermute_{dt}": (lambda d, dt=dt: case_unpermute(d, DTYPES[dt])) for dt in ("fp32", "bf16")},
    **{f"grouped_mm_{dt}": (lambda d, dt=dt: case_grouped_mm(d, DTYPES[dt])) for dt in ("fp32", "bf16")},
    **{f"layer_{gate}_{'dropless' if cf is None else 'capacity'}_{dt}": (
        lambda d, g=gate, cf=cf, dt=dt: case_layer(d, DTYPES[dt], g, cf))
       for gate, cf in (("naive", None), ("gshard", 1.0), ("switch", 1.0)) for dt in ("fp32", "bf16")},
}


def run(device: torch.device, names: list[str]) -> dict:
    """Run the named cases; a failure is recorded, not raised."""
    results = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            CASES[name](device)
            results[name] = {"ok": True, "error": ""}
        except Exception as e:  # noqa: BLE001  (every failure is reported by name)
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    args = ap.parse_args()
    print(json.dumps(run(torch.device(args.device), args.only or list(CASES))))


if __name__ == "__main__":
    main()
