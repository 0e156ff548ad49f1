"""Expert parallelism vs data parallelism for the MoE layer, and the all-to-all bytes it moves, on 2 and 4
gloo processes (CPU, 1 thread per process), in one run.

Measured per world size W (ep = W):
  step time  forward+backward of `MoELayer` with experts sharded over W ranks (`MoELayer.distribute`, all-to-all
             dispatch) against pure data parallelism (ep = 1: every rank holds all E experts, no all-to-all;
             its `token_group` is set to the world, as in DP training), same E and same tokens per rank.
             Both use the same uniform random routing (the real router runs, then its top-k ids are replaced
             by k distinct uniformly random experts per token). A step's time is the slowest rank's; figure =
             median over --repeats after --warmup, the steps taking turns. Also reported: the step plus the
             gradient all-reduce each layout needs (DP: every parameter; EP: the router only, as edp = 1).
  exchange   the EP step again with the dispatcher's rows exchanged by torch's functional all-to-all with
             autograd (`all_to_all_single_autograd` + `wait_tensor`, the dispatcher's exchange before
             2026-12-07) in place of its plain c10d call: ep_functional_over_ep is the baseline's time over ours.
  bytes      what leaves each rank in all-to-alls, counted from outside the package: every
             `torch.distributed.all_to_all_single` call (the count exchange, the dispatcher's forward calls and
             its autograd backward's) is wrapped; per call, sum of input split sizes to ranks other than self x
             row bytes. Divided by the analytic minimum
             2 x T*k x d_model x 4 B x (ep-1)/ep per forward (dispatch + combine; the backward's minimum is the
             same again). Target: mean ratio over ranks and steps <= 1.05 (one step's ratio also moves
             with the random routing's off-rank share, about +-1%). The counted dispatch rows are checked to
             equal the rows the routing sends off-rank, and the bytes are also given relative to those rows.
Defaults: T = 2048 tokens per rank, d_model = 256, expert hidden = 2*d_model = 512, E = 16, top_k = 2.
Note: this machine has 2 cores, so W = 4 oversubscribes them (both layouts alike).

Run:  .venv/bin/python bench/dispatch.py           (about 1-2 min)
      .venv/bin/python bench/dispatch.py --quick
The last line printed is one JSON object with all figures.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # run_distributed

from distributed import run_distributed  # noqa: E402
from machine import cpu_pressure  # noqa: E402

from lightning_smartmoe.moe import MoEConfig, MoELayer, Routing, dispatcher  # noqa: E402
from lightning_smartmoe.placement import Placement  # noqa: E402
from triton_ops import expert_histogram  # noqa: E402

TARGET_BYTES_RATIO = 1.05
THREADS = 1


class A2ACounter:
    """Sums the bytes each all-to-all sends to *other* ranks, by kind: integer payloads are the row counts,
    floating-point ones the rows (the dispatcher's forward calls and its autograd backward's)."""

    def __init__(self) -> None:
        self.bytes = {"rows": 0, "counts": 0}
        self.rows_sent: list[int] = []  # off-rank rows per all-to-all of rows, in call order
        self.calls = 0

    def add(self, input: torch.Tensor, input_split_sizes: list[int] | None, group) -> None:
        n, me = dist.get_world_size(group), dist.get_rank(group)
        row_bytes = (input[0].numel() if input.dim() > 1 else 1) * input.element_size()
        splits = input_split_sizes or [input.shape[0] // n] * n
        off = sum(s for r, s in enumerate(splits) if r != me)
        kind = "rows" if input.is_floating_point() else "counts"
        if kind == "rows":
            self.rows_sent.append(off)
        self.bytes[kind] += off * row_bytes
        self.calls += 1


def count_all_to_alls(counter_ref: dict) -> None:
    """Wrap dist.all_to_all_single so that every call is counted into counter_ref['c'] when set."""
    real = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if counter_ref.get("c") is not None:
            counter_ref["c"].add(input, input_split_sizes, group)
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counted


class FunctionalAllToAll:
    """The baseline exchange: torch's functional all-to-all with autograd (what the dispatcher used before), in
    place of lightning_smartmoe.moe.dispatcher._AllToAll."""

    @staticmethod
    def apply(rows: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
        return wait_tensor(all_to_all_single_autograd(rows, recv, send, group))


def use_uniform_routing(layer: MoELayer, holder: dict) -> None:
    """Run the real router, then replace its choices with holder['ids'] (uniform random, set per step)."""
    real = layer.router.forward

    def forward(x):
        r = real(x)
        ids = holder["ids"]
        return Routing(ids, r.weights, r.probs, r.lse, expert_histogram(ids, layer.cfg.num_experts)[0], r.dropped)

    layer.router.forward = forward


def fwd_bwd(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor) -> None:
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    y, aux = layer(x)
    torch.autograd.backward([y, aux], [gy, torch.ones_like(aux)])


def grad_sync(layer: MoELayer, expert_parallel: bool) -> None:
    """The gradient all-reduce each layout needs for this layer (EP with edp = 1: experts are unique)."""
    params = [layer.router.weight] if expert_parallel else list(layer.parameters())
    for p in params:
        dist.all_reduce(p.grad)


def worker(cfg: dict) -> dict:
    torch.set_num_threads(THREADS)
    rank, world = dist.get_rank(), dist.get_world_size()
    d, h, E, k, T = cfg["d_model"], cfg["hidden"], cfg["experts"], cfg["top_k"], cfg["tokens"]
    moe_cfg = MoEConfig(num_experts=E, top_k=k, gate="naive", capacity_factor=None)
    torch.manual_seed(0)  # same full weights on every rank and in both layouts
    dp = MoELayer(d, h, moe_cfg)
    torch.manual_seed(0)
    ep = MoELayer(d, h, moe_cfg)
    ep.distribute(dist.group.WORLD, dist.group.WORLD, Placement.contiguous(E, world))
    dp.token_group = dist.group.WORLD  # DP training all-reduces the routed counts for the aux loss too
    holder: dict = {}
    use_uniform_routing(dp, holder)
    use_uniform_routing(ep, holder)
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(2, T // 2, d, generator=gen).requires_grad_(True)
    gy = torch.randn(2, T // 2, d, generator=gen)

    def new_routing():
        holder["ids"] = torch.rand(T, E, generator=gen).topk(k, dim=1).indices

    # once: EP and DP give the same output and input gradient for the same routing
    new_routing()
    outs = []
    for layer in (dp, ep):
        fwd_bwd(layer, x, gy)
        outs.append((layer(x)[0].detach(), x.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)

    # bytes: a few un-timed EP steps under the counter
    ref: dict = {}
    count_all_to_alls(ref)
    local = E // world
    per_step = []
    for _ in range(cfg["byte_steps"]):
        new_routing()
        expected_off = int((holder["ids"] // local != rank).sum())
        for p in ep.parameters():
            p.grad = None
        fwd = A2ACounter()
        ref["c"] = fwd
        y, aux = ep(x)
        bwd = A2ACounter()
        ref["c"] = bwd
        torch.autograd.backward([y, aux], [gy, torch.ones_like(aux)])
        ref["c"] = None
        per_step.append({
            "fwd_rows_bytes": fwd.bytes["rows"], "fwd_count_bytes": fwd.bytes["counts"], "fwd_calls": fwd.calls,
            "bwd_rows_bytes": bwd.bytes["rows"], "bwd_count_bytes": bwd.bytes["counts"], "bwd_calls": bwd.calls,
            "fwd_rows_sent": fwd.rows_sent, "bwd_rows_sent": bwd.rows_sent,
            "expected_dispatch_rows_off_rank": expected_off,
        })

    # timing: EP, EP with the baseline exchange and DP take turns; every rank starts each step together
    times = {name: [] for name in ("ep", "ep_functional", "dp", "ep_sync", "ep_functional_sync", "dp_sync")}
    plain = dispatcher._AllToAll
    runs = (("ep", ep, True, plain), ("ep_functional", ep, True, FunctionalAllToAll), ("dp", dp, False, plain))
    for i in range(cfg["warmup"] + cfg["repeats"]):
        for name, layer, is_ep, exchange in runs[:: 1 if i % 2 == 0 else -1]:
            dispatcher._AllToAll = exchange
            new_routing()
            dist.barrier()
            t0 = time.perf_counter()
            fwd_bwd(layer, x, gy)
            t1 = time.perf_counter()
            grad_sync(layer, is_ep)
            t2 = time.perf_counter()
            if i >= cfg["warmup"]:
                times[name].append(t1 - t0)
                times[name + "_sync"].append(t2 - t0)
    # a step's time is its slowest rank's
    slowest = {}
    for name, v in times.items():
        t = torch.tensor(v, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest[name] = t.tolist()
    return {"rank": rank, "bytes": per_step, "times": slowest}


def summarize(world: int, cfg: dict, results: list[dict]) -> dict:
    T, k, d = cfg["tokens"], cfg["top_k"], cfg["d_model"]
    minimum = 2 * T * k * d * 4 * (world - 1) / world  # dispatch + combine, per forward, per rank
    fwd_ratios, fwd_rows_ratios, step_ratios, actual_ratios = [], [], [], []
    counted_ok = True
    for res in results:
        for s in res["bytes"]:
            fwd_total = s["fwd_rows_bytes"] + s["fwd_count_bytes"]
            fwd_ratios.append(fwd_total / minimum)
            fwd_rows_ratios.append(s["fwd_rows_bytes"] / minimum)
            step_ratios.append((fwd_total + s["bwd_rows_bytes"] + s["bwd_count_bytes"]) / (2 * minimum))
            # the 1st all-to-all of rows (dispatch) sends exactly the assignments routed off-rank
            dispatch_rows, combine_rows = s["fwd_rows_sent"]
            counted_ok &= dispatch_rows == s["expected_dispatch_rows_off_rank"]
            # against the rows this routing had to move (dispatch: routed off-rank; combine: received from others)
            actual_ratios.append(fwd_total / ((dispatch_rows + combine_rows) * d * 4))
    s0 = results[0]["bytes"][0]
    t = results[0]["times"]  # identical on every rank after the MAX all-reduce
    med = {n: statistics.median(v) * 1e3 for n, v in t.items()}
    return {
        "world": world,
        "ep": world,
        "experts_per_rank_ep": cfg["experts"] // world,
        "ep_step_ms": round(med["ep"], 2),
        "dp_step_ms": round(med["dp"], 2),
        "ep_over_dp": round(med["ep"] / med["dp"], 3),
        "ep_functional_step_ms": round(med["ep_functional"], 2),
        "ep_functional_over_ep": round(med["ep_functional"] / med["ep"], 3),
        "ep_step_with_grad_sync_ms": round(med["ep_sync"], 2),
        "dp_step_with_grad_sync_ms": round(med["dp_sync"], 2),
        "ep_over_dp_with_grad_sync": round(med["ep_sync"] / med["dp_sync"], 3),
        "a2a_min_bytes_per_fwd": minimum,
        "a2a_bytes_per_fwd_rank0": s0["fwd_rows_bytes"] + s0["fwd_count_bytes"],
        "a2a_count_exchange_bytes_per_fwd_rank0": s0["fwd_count_bytes"],
        "a2a_calls_per_fwd": s0["fwd_calls"],
        "a2a_calls_per_bwd": s0["bwd_calls"],
        "bytes_ratio_fwd_mean": round(statistics.mean(fwd_ratios), 4),
        "bytes_ratio_fwd_max": round(max(fwd_ratios), 4),
        "bytes_ratio_fwd_rows_only_mean": round(statistics.mean(fwd_rows_ratios), 4),
        "bytes_ratio_step_fwd_bwd_mean": round(statistics.mean(step_ratios), 4),
        "bytes_ratio_vs_rows_routed_off_rank_mean": round(statistics.mean(actual_ratios), 5),
        "bytes_samples": len(fwd_ratios),
        "bytes_target_met": statistics.mean(fwd_ratios) <= TARGET_BYTES_RATIO,
        "dispatch_rows_match_routing": counted_ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--hidden-mult", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--byte-steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=240, help="per world size, seconds")
    ap.add_argument("--quick", action="store_true", help="T=1024, warmup 1, repeats 3, 2 byte steps")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.warmup, args.repeats, args.byte_steps = 1024, 1, 3, 2
    torch.set_num_threads(THREADS)
    cfg = dict(tokens=args.tokens, d_model=args.d_model, hidden=args.hidden_mult * args.d_model,
               experts=args.experts, top_k=args.top_k, warmup=args.warmup, repeats=args.repeats,
               byte_steps=args.byte_steps)
    load0, psi0 = os.getloadavg()[0], cpu_pressure()
    print(f"MoE layer EP vs DP on gloo, CPU fp32, {THREADS} thread/process; per rank T={cfg['tokens']}, "
          f"d_model={cfg['d_model']}, expert_hidden={cfg['hidden']}, E={cfg['experts']}, top_k={cfg['top_k']}, "
          f"uniform random routing; median of {cfg['repeats']} after {cfg['warmup']} warm-up; "
          f"{os.cpu_count()} cores, load avg {load0:.2f}, CPU pressure avg10 {psi0}")
    rows = {}
    for world in args.worlds:
        if args.experts % world:
            raise SystemExit(f"--experts {args.experts} must be divisible by world {world}")
        t0 = time.perf_counter()
        results = run_distributed(world, worker, cfg, timeout=args.timeout)
        rows[world] = summarize(world, cfg, results)
        rows[world]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"  world={world} done in {rows[world]['wall_s']} s", flush=True)

    print()
    print(f"{'W':>2} {'EP ms':>8} {'DP ms':>8} {'EP/DP':>6} {'EP+sync':>8} {'DP+sync':>8} {'EP/DP':>6} "
          f"{'a2a B/fwd':>10} {'min B/fwd':>10} {'ratio':>6} {'step ratio':>10}  target <=1.05")
    for w, r in rows.items():
        print(f"{w:>2} {r['ep_step_ms']:>8.1f} {r['dp_step_ms']:>8.1f} {r['ep_over_dp']:>6.2f} "
              f"{r['ep_step_with_grad_sync_ms']:>8.1f} {r['dp_step_with_grad_sync_ms']:>8.1f} "
              f"{r['ep_over_dp_with_grad_sync']:>6.2f} {r['a2a_bytes_per_fwd_rank0']:>10d} "
              f"{r['a2a_min_bytes_per_fwd']:>10.0f} {r['bytes_ratio_fwd_mean']:>6.3f} "
              f"{r['bytes_ratio_step_fwd_bwd_mean']:>10.3f}  {'met' if r['bytes_target_met'] else 'NOT met'} "
              f"(mean over {r['bytes_samples']} rank-steps; max {r['bytes_ratio_fwd_max']:.3f}; vs the rows this "
              f"routing sent off-rank {r['bytes_ratio_vs_rows_routed_off_rank_mean']:.4f})")
    summary = {
        "bench": "dispatch",
        "threads_per_process": THREADS,
        "backend": "gloo",
        "device": "cpu",
        "dtype": "float32",
        "cores": os.cpu_count(),
        "tokens_per_rank": cfg["tokens"],
        "d_model": cfg["d_model"],
        "expert_hidden": cfg["hidden"],
        "experts": cfg["experts"],
        "top_k": cfg["top_k"],
        "routing": "uniform random (k distinct experts per token)",
        "warmup": cfg["warmup"],
        "repeats": cfg["repeats"],
        "stat": "median of slowest-rank step time",
        "bytes_target_max_ratio": TARGET_BYTES_RATIO,
        "load_avg_start": round(load0, 2),
        "load_avg_end": round(os.getloadavg()[0], 2),
        "cpu_pressure_avg10_start": psi0,
        "cpu_pressure_avg10_end": cpu_pressure(),
        "results": {str(w): r for w, r in rows.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
