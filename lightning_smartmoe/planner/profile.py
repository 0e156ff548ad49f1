"""Measurements of this machine, in the units of the cost models.

Two users. `placement.calibrate` (callbacks.py) takes quick start-up figures, each well under a second at the sizes
training uses: `expert_flops_per_s` (the expert FFN forward + backward at a layer's shape) and `link_bandwidth` (an
all-to-all inside a process group). smartmoe-profile calls `profile`, which measures every field of a
`planner.hardware.Hardware` at the shapes one rank of a layout computes (`ModelShapes`) and fits the collectives
(on the groups of `collective_groups`; none in one process, where `with_collectives_from` may lend them), the
expert FFN's per-group cost and the work of a layer and of the model's ends that no rate prices (the model's
own forward + backward on one process, less what the rates price: `fit_overheads`), the dispatcher's work around
its all-to-alls on each expert-parallel group size (`fit_dispatch`), how much slower a rank computes when the
node's ranks share its cores (`measure_sharing`), and how long a collective reached from compute then waits for
the ranks the scheduler ran less (`sync_times`, `fit_sync`). Every timing is the median of timed samples
(calls back to back for SAMPLE_S at least, started together on every rank) after warm-up calls; `agree` makes
every rank hold the same figures (the mean over the ranks that measured, rank 0's copy everywhere), so that every
rank plans alike.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_smartmoe.clipping import squared_norms
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.models import GPTMoEConfig, OptimConfig
from lightning_smartmoe.moe.experts import GroupedExperts
from lightning_smartmoe.planner import memory
from lightning_smartmoe.moe.dispatcher import TokenDispatcher
from lightning_smartmoe.planner.cost import CostModel, expert_layer_cost
from lightning_smartmoe.planner.hardware import OPS, SCOPES, Hardware, Link
from lightning_smartmoe.zero import all_gather_single, reduce_scatter_single

OPTIMIZER_MAX_PARAMS = 2**26  # the AdamW step is timed on at most this many parameters (1 GiB of fp32 state)
EXPERT_MAX_GROUPS = 8  # the expert FFN fit uses 1, 2, 4 ... up to this many groups (or the rank's experts)
EXPERT_MIN_ROWS = 16  # its smallest group
SAMPLE_S = 0.02  # a timed sample runs calls back to back for this long at least: on a shared or oversubscribed CPU,
# a millisecond call's own time mostly says whether the scheduler ran it; over 20 ms it averages to its share
PAYLOAD_EXTENSIONS = 2  # a collective fit that sees no growth with payload measures again at 4x, this often at most
SYNC_CALLS = 8  # compute-then-collective rounds per timed sample at least: the wait is a spread over many rounds
SYNC_MIN_S, SYNC_MAX_S = 2.5e-4, 0.016  # the compute chunks that measure it: from this long to the first past that


def _seconds_per_call(run: Callable[[], object], device: torch.device, calls: int) -> float:
    """Wall seconds per call of `calls` back-to-back calls of `run`, device work included (and nothing before)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def calls_per_sample(seconds: float) -> int:
    """Back-to-back calls of a `seconds`-long call that make one timed sample last SAMPLE_S at least."""
    return max(1, math.ceil(SAMPLE_S / seconds))


def median_seconds(runs: Mapping[str, Callable[[], object]], device: torch.device, repeats: int,
                   calls: Mapping[str, int] | None = None, before: Callable[[], object] | None = None,
                   warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each of `runs`: `warmup` single calls each, then `repeats` rounds that time one
    sample of every run in turn, `calls[name]` back-to-back calls (None: `calls_per_sample` of the last warm-up
    call's time; local work only, as a collective's calls must be the same number on every rank). `before`
    (untimed) precedes every call and sample, e.g. a barrier. Taking the runs in turn spreads a change of the
    machine's load (other processes) over all of them alike."""
    counts = {}
    for name, run in runs.items():
        last = 0.0
        for _ in range(warmup):
            if before is not None:
                before()
            last = _seconds_per_call(run, device, 1)
        counts[name] = calls[name] if calls is not None else calls_per_sample(last)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if before is not None:
                before()
            samples[name].append(_seconds_per_call(run, device, counts[name]))
    return {name: statistics.median(times) for name, times in samples.items()}


def lockstep_seconds(runs: Mapping[str, Callable[[], object]], device: torch.device, repeats: int,
                     min_calls: int = 1) -> dict[str, float]:
    """`median_seconds` of `runs` on every rank at once (collective over the world): one call each, timed after the
    warm-up, sizes the samples (`calls_per_sample` of its time agreed over the ranks, at least `min_calls`), so that
    every rank makes the same calls; a barrier before each sample; the medians agreed over the ranks."""
    first = agree(median_seconds(runs, device, 1, dict.fromkeys(runs, 1), dist.barrier), device)
    counts = {name: max(min_calls, calls_per_sample(t)) for name, t in first.items()}
    return agree(median_seconds(runs, device, repeats, counts, dist.barrier, warmup=0), device)


# ---- compute -------------------------------------------------------------------------------------------------------


def _forward_backward(forward: Callable[[], Tensor], leaves: Sequence[Tensor]) -> Callable[[], None]:
    """A training step of `forward`: its gradients on `leaves` cleared, then forward and backward (the output
    gradient a real tensor of ones, of the output's dtype)."""
    with torch.no_grad():
        grad = torch.ones_like(forward())

    def step() -> None:
        for t in leaves:
            t.grad = None
        forward().backward(grad)

    return step


def experts_and_input(experts: int, d_model: int, hidden: int, rows: int, device: torch.device,
                      dtype: torch.dtype) -> tuple[GroupedExperts, Tensor]:
    """`GroupedExperts` of `experts` experts of d_model x hidden and an input of `rows` rows, in `dtype`, seeded."""
    torch.manual_seed(0)
    module = GroupedExperts(experts, d_model, hidden).to(device=device, dtype=dtype)
    return module, torch.randn(rows, d_model, device=device, dtype=dtype)


def expert_ffn_step(module: GroupedExperts, x: Tensor, counts: Sequence[int]) -> Callable[[], None]:
    """`module`'s forward + backward (the layer's expert path, triton_ops.expert_ffn) on the first sum(counts) rows
    of x, counts[e] of them for expert e."""
    x = x[: sum(counts)].detach().requires_grad_()
    return _forward_backward(lambda: module(x, list(counts)), [x, *module.parameters()])


def expert_flops_per_s(
    d_model: int, hidden: int, rows: int, device: torch.device, dtype: torch.dtype = torch.float32,
    experts: int = 4, repeats: int = 5,
) -> float:
    """Effective FLOP/s of `GroupedExperts` forward + backward on `rows` rows split over `experts` experts of shape
    d_model x hidden: 6 * (2 * d_model * hidden) * rows / median time, the rate `Hardware.expert_flops` is."""
    module, x = experts_and_input(experts, d_model, hidden, rows, device, dtype)
    counts = [rows // experts + (e < rows % experts) for e in range(experts)]
    seconds = median_seconds({"": expert_ffn_step(module, x, counts)}, device, repeats)[""]
    return 6 * 2 * d_model * hidden * rows / seconds


def linear_step(rows: int, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """A bias-free linear layer's forward + backward (input and weight gradients: 6 * rows * d_in * d_out FLOPs),
    input and weight in `dtype`."""
    x = torch.randn(rows, d_in, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(d_out, d_in, device=device, dtype=dtype, requires_grad=True)
    return _forward_backward(lambda: F.linear(x, w), [x, w])


def attention_step(batch: int, heads: int, seq_len: int, head_dim: int, device: torch.device,
                   dtype: torch.dtype) -> Callable[[], None]:
    """Causal `scaled_dot_product_attention` forward + backward on q, k, v [batch, heads, seq_len, head_dim]."""
    qkv = [torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
           for _ in range(3)]
    return _forward_backward(lambda: F.scaled_dot_product_attention(*qkv, is_causal=True), qkv)


def optimizer_step(sizes: Sequence[int], device: torch.device, precision: str, optim: OptimConfig,
                   clip: bool) -> Callable[[], object]:
    """One AdamW step (`optim.adamw`, as training at trainer `precision` makes it) on tensors of `sizes`
    parameters (the rank's own tensors: their sizes decide how much of the state stays in cache), after gradient
    clipping as the strategy runs it when `clip` (every gradient's sum of squares, then every gradient scaled)."""
    params = [nn.Parameter(torch.zeros(n, device=device, dtype=memory.PARAM_DTYPES[precision])) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    opt = optim.adamw(params, [], precision)

    def step() -> None:
        if clip:
            torch._foreach_mul_(grads, float(1.0 / (squared_norms(grads).sum().sqrt() + 1e-6)))
        opt.step()

    return step


def model_step(cfg: GPTMoEConfig, layers: int, batch: int, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """Forward + backward of the loss (cross-entropy plus aux losses) of `cfg`'s model cut to `layers` layers, on
    one process, on `batch` random sequences."""
    torch.manual_seed(0)
    model = replace(cfg, n_layers=layers).build().to(device=device, dtype=dtype)
    idx = torch.randint(cfg.vocab_size, (batch + 1, cfg.seq_len), device=device)
    x, y = idx[:-1], idx[1:]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits, aux = model(x)
        (model.loss(logits, y) + aux).backward()

    return step


# ---- communication -------------------------------------------------------------------------------------------------


def payload_elements(op: str, nbytes: int, n: int, element_size: int) -> int:
    """Elements of `op`'s per-rank payload (hardware.py's convention) for about `nbytes` bytes on n ranks: rounded
    down to whole elements, for all_to_all and reduce_scatter to a multiple of n; at least one per rank."""
    count = max(1, nbytes // element_size)
    if op in ("all_to_all", "reduce_scatter"):
        count = max(n, count - count % n)
    return count


def collective_call(op: str, group: dist.ProcessGroup, nbytes: int, device: torch.device,
                    dtype: torch.dtype) -> Callable[[], None]:
    """One call of `op` inside `group` (every rank of the group makes it) with a payload of
    `payload_elements(op, nbytes, ...)` elements of `dtype`. p2p: a ring shift, every rank sending to the next
    rank of the group while receiving from the previous one."""
    n = dist.get_world_size(group)
    send = torch.zeros(payload_elements(op, nbytes, n, dtype.itemsize), dtype=dtype, device=device)
    if op == "all_to_all":
        recv = torch.empty_like(send)
        return lambda: dist.all_to_all_single(recv, send, group=group)
    if op == "all_reduce":
        return lambda: dist.all_reduce(send, group=group)
    if op == "all_gather":
        gathered = send.new_empty(n * send.numel())
        return lambda: all_gather_single(gathered, send, group=group)
    if op == "reduce_scatter":
        block = send.new_empty(send.numel() // n)
        return lambda: reduce_scatter_single(block, send, group=group)
    if op == "p2p":
        ranks = dist.get_process_group_ranks(group)
        i = ranks.index(dist.get_rank())
        recv = torch.empty_like(send)
        shift = [dist.P2POp(dist.isend, send, ranks[(i + 1) % n], group),
                 dist.P2POp(dist.irecv, recv, ranks[(i - 1) % n], group)]
        return lambda: [work.wait() for work in dist.batch_isend_irecv(shift)]
    raise ValueError(f"unknown collective {op!r}; known: {', '.join(OPS)}")


def link_bandwidth(group: dist.ProcessGroup, nbytes: int, device: torch.device, repeats: int = 5) -> float | None:
    """Bytes per second each rank sends to the others in an all_to_all_single of `nbytes` per peer inside `group`
    (collective over it); None for a group of one rank, which sends nothing."""
    size = dist.get_world_size(group)
    if size == 1:
        return None
    per_peer = max(1, nbytes // 4)
    call = collective_call("all_to_all", group, size * per_peer * 4, device, torch.float32)
    seconds = median_seconds({"": call}, device, repeats, {"": 1}, before=lambda: dist.barrier(group))[""]
    return (size - 1) * per_peer * 4 / seconds


def _sizes(count: int) -> list[int]:
    """2, 4, 8 ... dividing `count`, and `count` itself, from 2 up."""
    return sorted(n for n in {2**i for i in range(1, count.bit_length()) if count % 2**i == 0} | {count} if n >= 2)


def collective_groups(world: int, per_node: int) -> list[tuple[int, str, list[list[int]]]]:
    """(n, scope, groups) of every collective fit on `world` ranks, `per_node` to a node: the groups of n ranks that
    partition the world and are measured at once (every rank in one, as in training):
    - intra, n = 2, 4, 8 ... dividing per_node, and per_node: n consecutive ranks, inside a node;
    - inter, n = per_node times 2, 4 ... dividing the nodes, and the world: n consecutive ranks, whole nodes;
    - inter, n = 2, 4 ... dividing the nodes, and the nodes, where whole nodes give no fit of that n: one rank per
      node, the same local rank on n consecutive nodes (ranks j + k * per_node: every rank on its own NIC)."""
    nodes = world // per_node
    out = [(n, "intra", [list(range(s, s + n)) for s in range(0, world, n)]) for n in _sizes(per_node)]
    whole = [per_node * k for k in _sizes(nodes)]
    out += [(n, "inter", [list(range(s, s + n)) for s in range(0, world, n)]) for n in whole]
    out += [(n, "inter", [list(range(b + j, b + n * per_node, per_node))
                          for b in range(0, world, n * per_node) for j in range(per_node)])
            for n in _sizes(nodes) if n not in whole]
    return sorted(out, key=lambda fit: (fit[1] == "inter", fit[0]))


# ---- fits ----------------------------------------------------------------------------------------------------------


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """x with matrix x = rhs by Gaussian elimination with partial pivoting; None if the matrix is singular (a
    pivot below 1e-12: for a Gram matrix of unit columns, columns that are nearly parallel)."""
    n = len(rhs)
    a = [row[:] + [b] for row, b in zip(matrix, rhs)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


def nonnegative_least_squares(columns: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Coefficients x >= 0 minimising sum_i (sum_j x_j columns[j][i] - targets[i])^2: the best of the
    least-squares solutions on every subset of the columns (the others 0) that come out non-negative. Plain float
    arithmetic, so every rank gets the same bits from the same data."""
    k = len(columns)
    norms = [math.sqrt(sum(u * u for u in col)) for col in columns]
    unit = [[u / n for u in col] if n > 0 else col for col, n in zip(columns, norms)]  # solved unit-scaled
    best, best_residual = [0.0] * k, sum(t * t for t in targets)
    for mask in range(1, 2**k):
        used = [j for j in range(k) if mask >> j & 1 and norms[j] > 0]
        if len(used) < bin(mask).count("1"):
            continue
        gram = [[sum(u * v for u, v in zip(unit[a], unit[b])) for b in used] for a in used]
        x = _solve(gram, [sum(u * t for u, t in zip(unit[a], targets)) for a in used])
        if x is None or min(x) < 0:
            continue
        full = [0.0] * k
        for j, value in zip(used, x):
            full[j] = value / norms[j]
        residual = sum((sum(full[j] * columns[j][i] for j in used) - t) ** 2 for i, t in enumerate(targets))
        if residual < best_residual:
            best, best_residual = full, residual
    return best


def nonnegative_fit(first: Sequence[float], second: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """Coefficients (x, y) >= 0 of t ~ x * first + y * second by least squares on relative errors ((fit - t) / t:
    small and large cases count alike)."""
    x, y = nonnegative_least_squares([[u / t for u, t in zip(first, times)], [v / t for v, t in zip(second, times)]],
                                     [1.0] * len(times))
    return x, y


def fit_link(payloads: Sequence[float], times: Sequence[float]) -> Link:
    """t = latency_s + payload / bytes_per_s fitted to (payload bytes, seconds); ValueError if the time does not
    grow with the payload (noise larger than the transfer time: larger payloads are needed)."""
    latency, inverse = nonnegative_fit([1.0] * len(payloads), payloads, times)
    if inverse <= 0:
        raise ValueError("the time does not grow with the payload")
    return Link(latency, 1 / inverse)


def fit_expert(rows: Sequence[int], groups: Sequence[int], times: Sequence[float],
               flops_per_row: float) -> tuple[float, float]:
    """(expert_flops, expert_group_s) of time = rows * flops_per_row / expert_flops + groups * expert_group_s
    fitted to the cases (rows, non-empty groups, seconds); ValueError if the time does not grow with the rows."""
    inverse, group_s = nonnegative_fit([r * flops_per_row for r in rows], groups, times)
    if inverse <= 0:
        raise ValueError("the expert FFN's time does not grow with its rows")
    return 1 / inverse, group_s


# ---- agreement -----------------------------------------------------------------------------------------------------


def agree(figures: Mapping[str, float | None], device: torch.device) -> dict[str, float | None]:
    """Collective over the world: each figure averaged over the ranks that measured it (None where none did), then
    rank 0's result on every rank, so that every rank plans with bit-identical numbers."""
    keys = sorted(figures)
    values = torch.tensor([[figures[k] or 0.0, figures[k] is not None] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values)
        dist.broadcast(values, src=0)
    return {k: float(total / count) if count else None for k, (total, count) in zip(keys, values.tolist())}


# ---- the whole profile ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectivesFrom:
    """smartmoe-profile's `collectives_from`: a built-in datasheet profile or a calibration file (`name`, as given)
    and its Hardware, whose fits stand in for the scopes a run does not measure."""

    name: str
    hardware: Hardware


@dataclass(frozen=True)
class ProfileSettings:
    repeats: int  # timed samples per figure (median), after warm-up calls
    payload_bytes: tuple[int, ...]  # per-rank payloads of every collective fit


@dataclass(frozen=True)
class ModelShapes:
    """What one rank of a layout computes per micro-batch: its share of every linear layer (tensor parallelism
    cuts columns or rows, heads and vocabulary), its attention heads, its experts and routed rows, and the
    parameters its optimizer steps (the busiest rank's, planner.memory)."""

    precision: str  # trainer.precision: parameters in memory.PARAM_DTYPES; compute in bf16 under bf16-*
    batch: int  # sequences per micro-batch
    seq_len: int
    heads: int
    head_dim: int
    linears: tuple[tuple[str, int, int, int, int], ...]  # (name, rows, d_in, d_out, calls per forward)
    d_model: int
    expert_hidden: int
    expert_slots: int  # experts on the rank
    expert_rows: int  # rows of each of its experts under balanced routing
    param_sizes: tuple[int, ...]  # the elements of each tensor its optimizer steps
    optim: OptimConfig
    model: GPTMoEConfig  # for the per-layer work the rates miss (`overhead_cases`)
    clip: bool  # training clips the gradients' norm before each optimizer step

    @classmethod
    def of(cls, cfg: GPTMoEConfig, layout: memory.Layout, optim: OptimConfig, clip: bool = True) -> ModelShapes:
        sizes, d = layout.sizes, cfg.d_model
        tp = sizes.tp
        tokens = layout.micro_sequences * cfg.seq_len
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        dense_layers = cfg.n_layers - moe_layers
        linears = [("qkv", tokens, d, 3 * d // tp, cfg.n_layers), ("attn.proj", tokens, d // tp, d, cfg.n_layers),
                   ("ffn.fc", tokens, d, cfg.hidden // tp, dense_layers),
                   ("ffn.proj", tokens, cfg.hidden // tp, d, dense_layers),
                   ("lm_head", tokens, d, cfg.vocab_size // tp, 1)]
        routed = tokens // (tp if tp > 1 and not sizes.expert_tp else 1) * cfg.moe.top_k  # TP ranks route a slice each
        slots = cfg.moe.num_experts // sizes.ep
        stage = memory.largest(memory.rank_memory(cfg, layout)).stage
        table = memory.ModelTable(cfg, tp, layout.sequence_parallel, sizes.expert_tp, layout.precision)
        param_sizes = tuple(math.prod(r.shape) for r in table.stage_records(layout, stage) if r.trainable)
        return cls(
            precision=layout.precision, batch=layout.micro_sequences, seq_len=cfg.seq_len, heads=cfg.n_heads // tp,
            head_dim=d // cfg.n_heads, linears=tuple(x for x in linears if x[4]), d_model=d,
            expert_hidden=(cfg.moe.expert_hidden or cfg.hidden) // (tp if sizes.expert_tp else 1), expert_slots=slots,
            expert_rows=max(1, routed // slots), param_sizes=param_sizes, optim=optim, model=cfg, clip=clip,
        )

    @property
    def param_dtype(self) -> torch.dtype:
        return memory.PARAM_DTYPES[self.precision]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision.startswith("bf16") else self.param_dtype

    @property
    def expert_cases(self) -> list[tuple[int, int]]:
        """(groups, rows per group) of the expert FFN fit: 1, 2, 4 ... groups up to EXPERT_MAX_GROUPS or the rank's
        experts, times group sizes halving from twice the balanced size (at least 64) down to EXPERT_MIN_ROWS."""
        most = min(self.expert_slots, EXPERT_MAX_GROUPS)
        groups = sorted({2**i for i in range(most.bit_length()) if 2**i <= most} | {most})
        top = max(2 * self.expert_rows, 4 * EXPERT_MIN_ROWS)
        rows = [top >> i for i in range(top.bit_length()) if top >> i >= EXPERT_MIN_ROWS]
        return [(g, r) for g in groups for r in rows]

    @property
    def expert_flops_per_row(self) -> int:
        """Forward + backward FLOPs of one row through one expert: 3 x 2 matmuls of 2 * d_model * hidden."""
        return 12 * self.d_model * self.expert_hidden

    @property
    def attention_flops(self) -> int:
        """FLOPs of the attention core's forward + backward on one micro-batch: per token 4 * seq_len * (heads *
        head_dim) forward (scores q k^T and the weighted sum of v, 2 * seq_len * head_dim each per head), halved
        for the causal mask, times 3 for forward + backward (two matmuls backward per matmul forward)."""
        return self.batch * self.seq_len * 4 * self.seq_len * self.heads * self.head_dim // 2 * 3

    @property
    def optimizer_sizes(self) -> list[int]:
        """The tensors of `param_sizes` the AdamW step is timed on: all, or the first OPTIMIZER_MAX_PARAMS elements."""
        out, total = [], 0
        for n in self.param_sizes:
            out.append(min(n, OPTIMIZER_MAX_PARAMS - total))
            total += out[-1]
            if total >= OPTIMIZER_MAX_PARAMS:
                break
        return out

    @property
    def overhead_cases(self) -> list[tuple[int, int]]:
        """(layers, sequences) of the model steps that measure `Hardware.layer_s` and the rest (`fit_overheads`): 1
        and 2 layers, at this micro-batch, 2x and 4x it."""
        return [(layers, b) for layers in (1, 2) for b in (self.batch, 2 * self.batch, 4 * self.batch)]


def _compute_times(shapes: ModelShapes, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of every compute figure at `shapes`: each linear layer, each expert FFN case, the attention
    core, the optimizer step and the model steps, taken in turn (`median_seconds`), as training runs them:
    parameters in their own dtype, under autocast to the compute dtype where the precision is mixed. Every rank
    times every figure at the same time (collective over the world): the same number of back-to-back calls per
    sample on every rank and a barrier before each, so that every sample runs with every rank of the node
    computing, as training does."""
    mixed = shapes.compute_dtype != shapes.param_dtype
    steps: dict[str, Callable[[], object]] = {}
    with torch.autocast(device.type, dtype=shapes.compute_dtype) if mixed else nullcontext():
        for name, rows, d_in, d_out, _ in shapes.linears:
            steps[f"gemm/{name}"] = linear_step(rows, d_in, d_out, device, shapes.param_dtype)
        for groups in sorted({g for g, _ in shapes.expert_cases}):
            rows = [r for g, r in shapes.expert_cases if g == groups]
            module, x = experts_and_input(groups, shapes.d_model, shapes.expert_hidden, groups * max(rows), device,
                                          shapes.param_dtype)
            steps.update({f"expert/{groups}/{r}": expert_ffn_step(module, x, [r] * groups) for r in rows})
        steps["attention"] = attention_step(shapes.batch, shapes.heads, shapes.seq_len, shapes.head_dim, device,
                                            shapes.compute_dtype)
        steps["optimizer"] = optimizer_step(shapes.optimizer_sizes, device, shapes.precision, shapes.optim,
                                            shapes.clip)
        for layers, batch in shapes.overhead_cases:
            steps[f"model/{layers}/{batch}"] = model_step(shapes.model, layers, batch, device, shapes.param_dtype)
        if not dist.is_initialized():
            return median_seconds(steps, device, repeats)
        return lockstep_seconds(steps, device, repeats)


def _collective_dtype(op: str, shapes: ModelShapes) -> torch.dtype:
    """Reductions carry gradients (the parameters' dtype); all-to-all, all-gather and point-to-point carry
    activations and weights (the compute dtype)."""
    return shapes.param_dtype if op in ("all_reduce", "reduce_scatter") else shapes.compute_dtype


def _fit_collective(op: str, group: dist.ProcessGroup, shapes: ModelShapes, settings: ProfileSettings,
                    device: torch.device) -> Link:
    """`op`'s fit inside `group` (collective over the world: every rank fits its own group's, all at once, a world
    barrier before each timed sample, the payloads in turn); the times agreed over the ranks. A fit that finds no
    growth of time with payload measures again at 4x the largest payload, at most PAYLOAD_EXTENSIONS times, then
    raises ConfigError."""
    n, dtype = dist.get_world_size(group), _collective_dtype(op, shapes)
    payloads, times = list(settings.payload_bytes), {}
    for extension in range(PAYLOAD_EXTENSIONS + 1):
        if extension:
            payloads.append(4 * payloads[-1])
        calls = {str(b): collective_call(op, group, b, device, dtype) for b in payloads[len(times):]}
        times.update(lockstep_seconds(calls, device, settings.repeats))
        try:
            return fit_link([payload_elements(op, b, n, dtype.itemsize) * dtype.itemsize for b in payloads],
                            [times[str(b)] for b in payloads])
        except ValueError as err:
            error = err
    raise ConfigError(f"payload_bytes={list(settings.payload_bytes)}: {op} on {n} ranks: {error} up to {payloads[-1]} "
                      "bytes; give larger payloads or more repeats")


def own_groups(per_node: int) -> list[tuple[int, str, dist.ProcessGroup]]:
    """(n, scope, this rank's group) for every group size and scope of `collective_groups` (collective over the
    world: every rank creates every group, in turn); none in one process (no process group)."""
    if not dist.is_initialized():
        return []
    out = []
    for n, scope, rank_lists in collective_groups(dist.get_world_size(), per_node):
        groups = [dist.new_group(ranks) for ranks in rank_lists]
        out.append((n, scope, next(g for g, ranks in zip(groups, rank_lists) if dist.get_rank() in ranks)))
    return out


def collective_fits(shapes: ModelShapes, settings: ProfileSettings, device: torch.device,
                    groups: Sequence[tuple[int, str, dist.ProcessGroup]]) -> dict[str, dict[str, dict[int, Link]]]:
    """Every op's fit on each of `groups` (`own_groups`; collective over the world), each rank in its own group;
    empty without groups (one process), which has no collective to measure."""
    fits: dict[str, dict[str, dict[int, Link]]] = {}
    for n, scope, group in groups:
        for op in OPS:
            fits.setdefault(op, {}).setdefault(scope, {})[n] = _fit_collective(op, group, shapes, settings, device)
    return fits


def dispatch_step(group: dist.ProcessGroup | None, experts: int, tokens: int, d_model: int, top_k: int,
                  device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """The dispatcher's round trip of one micro-batch with no expert work: `tokens` rows of d_model, each routed to
    top_k distinct uniformly random experts, dispatched over `group` (None: this rank holds every expert),
    combined, and back (backward)."""
    n = 1 if group is None else dist.get_world_size(group)
    dispatcher = TokenDispatcher(experts // n, group)
    gen = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    x = torch.randn(tokens, d_model, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    ids = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices.to(device)
    weights = torch.full((tokens, top_k), 1 / top_k, device=device, dtype=dtype)

    def step() -> None:
        x.grad = None
        rows, _, state = dispatcher.dispatch(x, ids)
        dispatcher.combine(rows, weights, state).sum().backward()

    return step


def dispatch_times(shapes: ModelShapes, settings: ProfileSettings, device: torch.device,
                   groups: Sequence[tuple[int, str, dist.ProcessGroup]]) -> dict[int, float]:
    """Median seconds of `dispatch_step` at `shapes`' micro-batch on one rank (key 1) and on each node-local group
    of `groups` (`own_groups`, intra) whose size divides the experts (collective over the world: each rank in its
    own group, the same calls per sample everywhere, a barrier before each sample); empty without groups."""
    if not groups:
        return {}
    cfg, tokens = shapes.model, shapes.batch * shapes.seq_len
    args = (cfg.moe.num_experts, tokens, shapes.d_model, cfg.moe.top_k, device, shapes.compute_dtype)
    steps = {"1": dispatch_step(None, *args)}
    for n, scope, group in groups:
        if scope == "intra" and cfg.moe.num_experts % n == 0:
            steps[str(n)] = dispatch_step(group, *args)
    return {int(name): t for name, t in lockstep_seconds(steps, device, settings.repeats).items()}


def fit_dispatch(hw: Hardware, shapes: ModelShapes, times: Mapping[int, float]) -> dict[int, float]:
    """Hardware.dispatch_s from `dispatch_times` (hw: with its collective fits): each group's round trip less the
    one-rank round trip (its permutes, which the model's own step prices) and less what the cost model prices of it
    (its all-to-alls at balanced load, the all-to-all of the row counts), at least 0."""
    cfg, tokens = shapes.model, shapes.batch * shapes.seq_len
    experts = cfg.moe.num_experts
    out = {}
    for n, seconds in times.items():
        if n == 1:
            continue
        cost = expert_layer_cost(hw, ParallelSizes(dp=n, ep=n), shapes.d_model, shapes.expert_hidden, shapes.precision)
        per_rank = experts // n
        placement = [tuple(range(r * per_rank, (r + 1) * per_rank)) for r in range(n)]
        a2a = cost.terms(placement, [n * tokens * cfg.moe.top_k / experts] * experts)[1]
        counts = hw.link("all_to_all", n).time(experts * 8)  # int64 rows per slot of every rank
        out[n] = max(0.0, seconds - times[1] - a2a - counts)
    return out


def shares_cores(device: torch.device, per_node: int) -> bool:
    """Whether the node's ranks share its cores: more processes per node than usable cores, on a CPU (a GPU each,
    a core each or one process: no)."""
    return dist.is_initialized() and device.type == "cpu" and per_node > len(os.sched_getaffinity(0))


def measure_sharing(step: Callable[[], object], device: torch.device, per_node: int, repeats: int) -> float:
    """Hardware.sharing (collective over the world): 1 where the ranks do not share cores (`shares_cores`); else
    the median time of `step` when every rank runs it at once over its time on each node's first rank while the
    node's other ranks wait (the same number of back-to-back calls per sample everywhere, a barrier before each
    sample), at least 1."""
    if not shares_cores(device, per_node):
        return 1.0
    first = agree(median_seconds({"": step}, device, 1, {"": 1}, dist.barrier), device)[""]
    counts = {"": calls_per_sample(first)}
    alone = None
    dist.barrier()
    if dist.get_rank() % per_node == 0:
        alone = median_seconds({"": step}, device, repeats, counts, warmup=0)[""]
    dist.barrier()
    together = median_seconds({"": step}, device, repeats, counts, dist.barrier, warmup=0)[""]
    figures = agree({"alone": alone, "together": together}, device)
    return max(1.0, figures["together"] / figures["alone"])


def sync_times(shapes: ModelShapes, settings: ProfileSettings, device: torch.device,
               groups: Sequence[tuple[int, str, dist.ProcessGroup]], per_node: int) -> dict[str, float]:
    """Median seconds per round, every rank at once (collective over the world, a barrier before each sample, the
    same rounds per sample everywhere), of `collective`: an all-reduce of 8 bytes on the node's group, back to back;
    `compute/R`: a linear layer's forward + backward on R rows at the model's width (d_model -> 4 d_model), back to
    back; and `reached/R`: that compute, then the all-reduce. R runs over 8, 32, 128 ... (at most 8 x 4^9) from the
    first whose compute takes SYNC_MIN_S to the first past SYNC_MAX_S. Empty where the ranks do not share cores
    (`shares_cores`) or no group of `groups` (`own_groups`) spans the node."""
    node = next((g for n, scope, g in groups if scope == "intra" and n == per_node), None)
    if not shares_cores(device, per_node) or node is None:
        return {}
    flag = torch.zeros(1, dtype=torch.float64, device=device)
    d, steps = shapes.d_model, {}
    for rows in (8 * 4**k for k in range(10)):
        compute = linear_step(rows, d, 4 * d, device, shapes.param_dtype)
        seconds = agree(median_seconds({"": compute}, device, 3, None, dist.barrier), device)[""]
        if seconds >= SYNC_MIN_S:
            steps[f"compute/{rows}"] = compute
            steps[f"reached/{rows}"] = lambda compute=compute: (compute(), dist.all_reduce(flag, group=node))
        if seconds > SYNC_MAX_S:
            break
    steps["collective"] = lambda: dist.all_reduce(flag, group=node)
    return lockstep_seconds(steps, device, settings.repeats, SYNC_CALLS)


def fit_sync(times: Mapping[str, float]) -> dict[str, float]:
    """Hardware's sync_s and sync_work_s from `sync_times`: the wait after each chunk of compute is `reached` less
    `compute` less the all-reduce back to back (`collective`), fitted as sync_s x work / (work + sync_work_s) by
    least squares (sync_work_s on a log grid from a 16th of the shortest chunk to 16x the longest, sync_s in closed
    form, at least 0); both 0 without times or if no wait is positive."""
    chunks = sorted(int(name.split("/")[1]) for name in times if name.startswith("compute/"))
    if not chunks:
        return {"sync_s": 0.0, "sync_work_s": 0.0}
    work = [times[f"compute/{r}"] for r in chunks]
    waits = [times[f"reached/{r}"] - times[f"compute/{r}"] - times["collective"] for r in chunks]
    if not any(w > 0 for w in waits):
        return {"sync_s": 0.0, "sync_work_s": 0.0}
    low, high, best = min(work) / 16, max(work) * 16, (math.inf, 0.0, 0.0)
    for i in range(65):
        half = low * (high / low) ** (i / 64)
        shape = [w / (w + half) for w in work]
        sync = max(0.0, sum(g * y for g, y in zip(shape, waits)) / sum(g * g for g in shape))
        error = sum((sync * g - y) ** 2 for g, y in zip(shape, waits))
        if error < best[0]:
            best = (error, sync, half)
    return {"sync_s": best[1], "sync_work_s": best[2]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"cpu ({model})"


def device_memory_gb(device: torch.device, processes_per_node: int) -> float:
    """GiB one rank may use: a GPU's total memory; on a CPU, the host's memory over its processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / processes_per_node


def measured_scopes(devices: int, nodes: int) -> list[str]:
    """The scopes whose collectives a run of `devices` processes on each of `nodes` nodes measures."""
    return (["intra"] if devices >= 2 else []) + (["inter"] if nodes >= 2 else [])


def with_collectives_from(hw: Hardware, collectives_from: CollectivesFrom | None) -> Hardware:
    """`hw` (as measured) with each scope it has no fits of taken whole from `collectives_from`, and its GPUs per
    node too when those give the intra fits (the node the fits describe); the source says which collectives were
    measured and where the others come from."""
    measured, lender = hw.scopes, collectives_from.hardware if collectives_from is not None else None
    borrowed = [scope for scope in lender.scopes if scope not in measured] if lender is not None else []
    collectives = {op: {scope: (hw if scope in measured else lender).collectives[op][scope]
                        for scope in SCOPES if scope in measured + borrowed} for op in OPS if measured + borrowed}
    parts = [f"{' and '.join(measured)} measured"] if measured else []
    if borrowed:
        parts.append(f"{' and '.join(borrowed)} from collectives_from={collectives_from.name} "
                     f"({collectives_from.hardware.source})")
    gpus_per_node = lender.gpus_per_node if "intra" in borrowed else hw.gpus_per_node
    provenance = ", ".join(parts) or "none (one device, no collectives_from)"
    return replace(hw, collectives=collectives, gpus_per_node=gpus_per_node, source=f"{hw.source}; collectives: {provenance}")


def profile(shapes: ModelShapes, settings: ProfileSettings, device: torch.device, per_node: int,
            source: str) -> tuple[Hardware, dict[str, float]]:
    """Every Hardware field, measured on the world's ranks at `shapes` (collective: every rank calls it with the
    same arguments, on its own device), all ranks at once as in training; `measure_sharing` compares a rank
    computing alone with all computing. Every timing is agreed over the ranks before it is fitted, and rank 0's
    Hardware (its device name and `source`) is broadcast: every rank returns the same one, with the compute timings
    (seconds by name, every rank computing) it was fitted to. One process (no process group) measures the compute
    figures only. ConfigError if a fit finds no growth of time with size."""
    times = _compute_times(shapes, settings.repeats, device)
    times["memory_gb"] = device_memory_gb(device, per_node)
    t = agree(times, device)
    sharing = measure_sharing(model_step(shapes.model, 1, shapes.batch, device, shapes.param_dtype), device, per_node,
                              settings.repeats)
    weights = [(calls * 6 * rows * d_in * d_out, calls * t[f"gemm/{name}"])
               for name, rows, d_in, d_out, calls in shapes.linears]
    cases = shapes.expert_cases
    try:
        expert_flops, expert_group_s = fit_expert(
            [g * r for g, r in cases], [g for g, _ in cases], [t[f"expert/{g}/{r}"] for g, r in cases],
            shapes.expert_flops_per_row)
    except ValueError as err:
        raise ConfigError(f"repeats={settings.repeats}: {err}; measure with more repeats") from None
    groups = own_groups(per_node)
    collectives = collective_fits(shapes, settings, device, groups)
    hw = [Hardware(
        name=device_name(device), source=source, gpus_per_node=per_node, memory_gb=t["memory_gb"],
        gemm_flops=sum(f for f, _ in weights) / sum(s for _, s in weights),
        expert_flops=expert_flops, expert_group_s=expert_group_s,
        attention_flops=shapes.attention_flops / t["attention"],
        optimizer_s_per_param=t["optimizer"] / sum(shapes.optimizer_sizes),
        collectives=collectives, sharing=sharing,
    )]
    hw[0] = replace(hw[0], **fit_overheads(hw[0], shapes, t))
    hw[0] = replace(hw[0], dispatch_s=fit_dispatch(hw[0], shapes, dispatch_times(shapes, settings, device, groups)))
    hw[0] = replace(hw[0], **fit_sync(sync_times(shapes, settings, device, groups, per_node)))
    if dist.is_initialized():
        dist.broadcast_object_list(hw, src=0, device=device)  # nodes may differ in host and device names
    return hw[0], t


def unpriced_seconds(hw: Hardware, shapes: ModelShapes, layers: int, batch: int, seconds: float) -> float:
    """What hw's rates leave unpriced of a measured `model_step(shapes.model, layers, batch)`: its time less the
    cost model's dense, attention and expert terms for it (one process, balanced routing)."""
    cfg = replace(shapes.model, n_layers=layers)
    layout = memory.Layout(ParallelSizes(1, 1, 1, 1), global_batch=batch, precision=shapes.precision)
    model, experts = CostModel(cfg, hw), range(cfg.moe.num_experts)
    rows = batch * cfg.seq_len * cfg.moe.top_k / cfg.moe.num_experts
    expert_s = model.expert_layer(layout).terms([tuple(experts)], [rows for _ in experts])[0]
    common = model._stage_common(layout, 0)  # noqa: SLF001 (its dense, attention and overhead terms, no experts)
    return seconds - common.dense - common.attention - expert_s * sum(map(cfg.is_moe_layer, range(layers)))


def fit_overheads(hw: Hardware, shapes: ModelShapes, times: Mapping[str, float]) -> dict[str, float]:
    """Hardware's layer_s, layer_token_s, ends_s, ends_token_s from the model steps of `shapes.overhead_cases`
    (`times`: profile's, hw: fitted without them): what the rates leave unpriced of a step of n layers on T tokens
    is ends_s + ends_token_s T + n (layer_s + layer_token_s T), fitted to every case at once, non-negative, each
    case's error relative to its measured step (the noise grows with it, not with the small remainder)."""
    cases = shapes.overhead_cases
    steps = [times[f"model/{n}/{b}"] for n, b in cases]
    tokens = [b * shapes.seq_len for _, b in cases]
    unpriced = [unpriced_seconds(hw, shapes, n, b, t) for (n, b), t in zip(cases, steps)]
    columns = [[1.0] * len(cases), tokens, [n for n, _ in cases], [n * t for (n, _), t in zip(cases, tokens)]]
    x = nonnegative_least_squares([[c / t for c, t in zip(col, steps)] for col in columns],
                                  [u / t for u, t in zip(unpriced, steps)])
    return dict(zip(("ends_s", "ends_token_s", "layer_s", "layer_token_s"), x))


def group_slowdown(hw: Hardware, rows: int, flops_per_row: float) -> float:
    """Time per row of an expert group of `rows` rows over that of a very large group, under hw's fit."""
    return 1 + hw.expert_group_s * hw.expert_flops / (rows * flops_per_row)


def expert_fit_errors(hw: Hardware, shapes: ModelShapes, times: Mapping[str, float]) -> list[float]:
    """(fit - measured) / measured of hw's expert FFN fit on each case of `shapes.expert_cases` (`times`: profile's)."""
    return [g * (r * shapes.expert_flops_per_row / hw.expert_flops + hw.expert_group_s) / times[f"expert/{g}/{r}"] - 1
            for g, r in shapes.expert_cases]
