"""Quick measurements of this machine, in the units of planner/hardware.py (each well under a second at the
sizes training uses): expert FFN forward + backward throughput at a layer's expert shape, and the point-to-point
bandwidth inside a process group. `agree` makes every rank hold the same figures, so that every rank reaches the
same placement decisions."""

import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from lightning_smartmoe.moe.experts import GroupedExperts


def _median_seconds(run: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        run()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def expert_flops_per_s(
    d_model: int, hidden: int, rows: int, device: torch.device, dtype: torch.dtype = torch.float32,
    experts: int = 4, repeats: int = 5,
) -> float:
    """Effective FLOP/s of `GroupedExperts` forward + backward on `rows` rows split over `experts` experts of shape
    d_model x hidden: 6 * (2 * d_model * hidden) * rows / median time, the rate `Hardware.expert_flops` is."""
    torch.manual_seed(0)
    module = GroupedExperts(experts, d_model, hidden).to(device=device, dtype=dtype)
    x = torch.randn(rows, d_model, device=device, dtype=dtype, requires_grad=True)
    counts = [rows // experts + (e < rows % experts) for e in range(experts)]

    def step() -> None:
        module.zero_grad(set_to_none=True)
        module(x, counts).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return 6 * 2 * d_model * hidden * rows / _median_seconds(step, repeats)


def link_bandwidth(group: dist.ProcessGroup, nbytes: int, device: torch.device, repeats: int = 5) -> float | None:
    """Bytes per second each rank sends to the others in an all_to_all_single of `nbytes` per peer inside `group`
    (collective over it); None for a group of one rank, which sends nothing."""
    size = dist.get_world_size(group)
    if size == 1:
        return None
    per_peer = max(1, nbytes // 4)
    send = torch.ones(size * per_peer, dtype=torch.float32, device=device)
    recv = torch.empty_like(send)

    def exchange() -> None:
        dist.barrier(group)
        dist.all_to_all_single(recv, send, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return (size - 1) * per_peer * 4 / _median_seconds(exchange, repeats)


def agree(figures: Mapping[str, float | None], device: torch.device) -> dict[str, float | None]:
    """Collective over the world: each figure averaged over the ranks that measured it (None where none did), then
    rank 0's result on every rank, so that every rank plans with bit-identical numbers."""
    keys = sorted(figures)
    values = torch.tensor([[figures[k] or 0.0, figures[k] is not None] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values)
        dist.broadcast(values, src=0)
    return {k: float(total / count) if count else None for k, (total, count) in zip(keys, values.tolist())}
