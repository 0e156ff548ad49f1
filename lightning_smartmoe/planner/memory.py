"""The memory of every rank of a layout: parameters, gradients, optimizer state and activations, in bytes.

The first three are counted from the rank's own part of the model, built as the strategy builds it (on the meta
device under a fake process group of the layout's world size: nothing is allocated, any world size fits in one
process), with the ZeRO blocks the strategy would cut. Activations follow a per-layer model of the tensors
autograd saves for backward in this implementation (`activation_bytes`), times the micro-batches a pipeline
schedule keeps in flight; `SavedActivations` measures the same quantity on a real run.

Gradients are counted at their peak within a step: whole for ZeRO stages 0 and 1 (stage 1 drops them after the
reduction); at stage 2 the cut parameters' blocks, unless micro-batches (accumulation or a pipeline) make the
full gradients accumulate until the last one. Optimizer state is AdamW's two moments of what the optimizer steps,
plus the fp32 master blocks of bf16 weights under ZeRO. Transient buffers (communication buckets, one op's
output) are not counted.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe.layout import ParallelLayout, ParallelSizes
from lightning_smartmoe.models import ModelConfig
from lightning_smartmoe.strategy import expert_param_ids, keep_share
from lightning_smartmoe.zero import cut_dim

PARAM_DTYPES = {"64-true": torch.float64, "32-true": torch.float32, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}
_INDEX = 8  # bytes of an int64 index


@dataclass(frozen=True)
class Layout:
    """A layout of a training run, as the strategy takes it."""

    sizes: ParallelSizes
    microbatches: int = 1
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    extra_slots: int = 0
    zero: int = 0
    precision: str = "32-true"
    accumulate: int = 1
    global_batch: int = 16

    @property
    def micro_sequences(self) -> int:
        """Sequences per pipeline micro-batch (per forward without a pipeline) on one rank."""
        return self.global_batch // (self.sizes.dp * self.accumulate * self.microbatches)


@dataclass(frozen=True)
class RankMemory:
    rank: int
    stage: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    count: int = 1  # ranks with these figures (rank is the first)

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def as_dict(self) -> dict:
        return {"rank": self.rank, "stage": self.stage, "count": self.count, "params_bytes": self.params_bytes,
                "grads_bytes": self.grads_bytes, "optimizer_bytes": self.optimizer_bytes,
                "activations_bytes": self.activations_bytes, "total_bytes": self.total_bytes}


# ---- activations ------------------------------------------------------------------------------------------------


def _norm(tokens: float, d: int, b: int) -> float:
    """LayerNorm: its input and the per-token mean and reciprocal standard deviation."""
    return tokens * (d + 2) * b


def block_activation_bytes(cfg: ModelConfig, moe: bool, tokens: int, tp: int, sequence_parallel: bool,
                           expert_tp: bool, ep: int, b: int) -> float:
    """Bytes one transformer block saves for backward on one rank, for `tokens` tokens of its micro-batch (all its
    sequences, whole; a tensor-parallel rank keeps what its shard needs), activations of b bytes each; router and
    loss math in at least fp32. MoE layers: the rank's expert rows assume balanced routing."""
    d, h = cfg.d_model, cfg.n_heads
    f = max(b, 4)
    local = tokens / tp if sequence_parallel else tokens  # tokens of the norm and residual regions
    attention = (
        _norm(local, d, b)
        + tokens * d * b  # the qkv input (all-gathered under sequence parallelism)
        + tokens * 4 * d / tp * b  # q, k, v and the attention output (= the projection input)
        + (0 if cfg.recompute == "selective" else tokens * h / tp * f)  # the attention's logsumexp
    )
    ffn = _norm(local, d, b)
    if moe:
        m, k = cfg.moe, cfg.moe.top_k
        routed = tokens if expert_tp else tokens / tp  # tokens this rank routes
        rows = routed * k  # rows its experts compute (balanced)
        hidden = (m.expert_hidden or cfg.hidden) / (tp if expert_tp else 1)
        acts = 3 if m.activation == "swiglu" else 2  # SwiGLU: gate and up projections, and their product
        ffn += (
            routed * d * b  # router input
            + routed * (2 * m.num_experts + k + 2) * f  # probabilities, logits (z-loss), gate weights and sums
            + routed * k * _INDEX  # chosen experts
            + rows * (3 * d + acts * hidden) * b  # expert input, activation inputs and output, output twice (combine)
            + rows * ((4 if ep > 1 else 3) * _INDEX + f)  # dispatch / combine indices, gathered gate weights
        )
        if m.shared_experts:  # a dense FFN beside the experts
            ffn += _dense_ffn(tokens, d, m.shared_hidden(m.expert_hidden or cfg.hidden) / tp, m.activation, b)
    else:
        ffn += _dense_ffn(tokens, d, cfg.hidden / tp, cfg.dense_activation, b)
    return attention + ffn


def _dense_ffn(tokens: float, d: int, hidden: float, activation: str, b: int) -> float:
    """A dense FFN's saved activations: its input, the activation's inputs and output (GELU: 2, SwiGLU: 3 of the
    rank's `hidden` units)."""
    return tokens * d * b + (3 if activation == "swiglu" else 2) * tokens * hidden * b


def stage_activation_bytes(cfg: ModelConfig, layout: Layout, layers: list[int], first: bool, last: bool) -> tuple[float, float]:
    """(one micro-batch's saved activations on a rank holding `layers` (and the embedding / the head), the
    transient activations of one recomputed block during backward)."""
    sizes = layout.sizes
    b = 2 if layout.precision.startswith("bf16") else PARAM_DTYPES[layout.precision].itemsize
    tokens = layout.micro_sequences * cfg.seq_len
    tp, sp = sizes.tp, layout.sequence_parallel
    blocks = [block_activation_bytes(cfg, cfg.is_moe_layer(i), tokens, tp, sp, sizes.expert_tp, sizes.ep, b) for i in layers]
    if cfg.recompute == "full":  # each block keeps its input; backward recomputes one block at a time
        kept = len(layers) * (tokens / tp if sp else tokens) * cfg.d_model * b
    else:
        kept = sum(blocks)
    if first:
        kept += tokens * _INDEX  # token ids
    if last:
        kept += _norm(tokens / tp if sp else tokens, cfg.d_model, b) + tokens * cfg.d_model * b  # final norm, head input
        kept += tokens * (cfg.vocab_size / tp * max(b, 4) + _INDEX + 1)  # softmax over the vocab shard, target ids
    return kept, (max(blocks) if cfg.recompute == "full" and blocks else 0.0)


def in_flight(layout: Layout, stage: int) -> int:
    """Micro-batches (chunks, for interleaved 1F1B) whose activations a pipeline rank holds at once."""
    pp, m, v = layout.sizes.pp, layout.microbatches, layout.virtual_stages
    if pp == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return m
    if layout.pp_schedule == "interleaved_1f1b":
        return min(m * v, 2 * (pp - stage - 1) + (v - 1) * pp + 1)
    return min(m, pp - stage)


def activation_bytes(cfg: ModelConfig, layout: Layout, stage: int) -> int:
    """Peak saved activations of a rank of pipeline stage `stage` (its virtual stages included)."""
    per_chunk_layers = cfg.n_layers // (layout.sizes.pp * layout.virtual_stages)
    chunks = []
    for chunk in range(layout.virtual_stages):
        s = stage + chunk * layout.sizes.pp
        layers = list(range(s * per_chunk_layers, (s + 1) * per_chunk_layers))
        chunks.append(stage_activation_bytes(cfg, layout, layers, s == 0, s == layout.sizes.pp * layout.virtual_stages - 1))
    kept = sum(k for k, _ in chunks) / layout.virtual_stages  # the mean chunk
    recomputed = max(r for _, r in chunks)
    return int(kept * in_flight(layout, stage) + recomputed)


class SavedActivations:
    """Measures bytes of the storages autograd keeps for backward, live and peak: a saved_tensors_hooks pair
    (`with torch.autograd.graph.saved_tensors_hooks(m.pack, m.unpack)`); each storage counted once while any saved
    reference to it lives; storages in `exclude` (the parameters') not at all."""

    class _Held:
        __slots__ = ("t", "key", "owner")

        def __init__(self, t: Tensor, key: tuple[int, int], owner: "SavedActivations") -> None:
            self.t, self.key, self.owner = t, key, owner

        def __del__(self) -> None:
            self.owner._release(self.key)

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.refs: dict[tuple[int, int], int] = {}
        self.live = self.peak = 0

    @staticmethod
    def storage_key(t: Tensor) -> tuple[int, int] | None:
        try:
            s = t.untyped_storage()
            return (s.data_ptr(), s.nbytes()) if s.nbytes() else None
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            return None

    def _release(self, key: tuple[int, int]) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= key[1]

    def pack(self, t: Tensor) -> object:
        key = self.storage_key(t)
        if key is None or key[0] in self.exclude:
            return t
        if key not in self.refs:
            self.refs[key] = 0
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return SavedActivations._Held(t, key, self)

    @staticmethod
    def unpack(x: object) -> Tensor:
        return x.t if isinstance(x, SavedActivations._Held) else x


# ---- parameters, gradients, optimizer state --------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRecord:
    """What the memory model needs of one tensor a rank holds (a parameter, or a buffer: trainable False)."""

    shape: tuple[int, ...]
    itemsize: int
    expert: bool = False  # a stack of expert slots [slots, ...]
    tp_dim: int | None = None  # the tensor-parallel dimension it is a shard of
    tp_partial: bool = False  # its gradient is partial over tensor parallelism (never cut by ZeRO)
    trainable: bool = True


def _record(t: Tensor, expert: bool) -> ParamRecord:
    """A parameter's record, or a buffer's (not trainable)."""
    return ParamRecord(tuple(t.shape), t.element_size(), expert, getattr(t, "tp_shard_dim", None),
                       getattr(t, "tp_partial", False), t.requires_grad)


def records_of(module: nn.Module) -> list[ParamRecord]:
    """The records of every parameter and buffer of `module` (meta tensors are fine)."""
    expert = expert_param_ids(module)
    return [_record(t, id(t) in expert) for t in (*module.parameters(), *module.buffers())]


def state_bytes(records: list[ParamRecord], layout: Layout, dense_block: int = 0, expert_block: int = 0) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes of a rank holding `records`, with the ZeRO cuts the strategy
    makes (zero.cut_dim over the data-parallel group for dense parameters, the expert-data-parallel group for
    experts; this rank holding blocks `dense_block` and `expert_block`); under bf16-mixed with ZeRO every weight
    is stored in bf16 and stepped through an fp32 master."""
    sizes = layout.sizes
    groups = {False: sizes.dp if layout.zero else 1, True: sizes.edp if layout.zero else 1}
    bf16_masters = bool(layout.zero) and layout.precision == "bf16-mixed"
    micro = layout.accumulate * layout.microbatches > 1
    params = grads = optim = 0
    for r in records:
        numel = math.prod(r.shape)
        if not r.trainable:
            params += numel * r.itemsize
            continue
        stored = 2 if bf16_masters else r.itemsize  # bytes per weight and gradient element
        master = 4 if bf16_masters else r.itemsize  # bytes per element of what the optimizer steps
        n = groups[r.expert]
        dim = cut_dim(r.shape, r.tp_dim, r.expert) if n > 1 and not r.tp_partial else None
        params += numel * stored
        if dim is None:
            grads += numel * stored
            optim += numel * (2 * master + (4 if bf16_masters else 0))
            continue
        rows = math.ceil(r.shape[dim] / n)
        block = max(0, min(rows, r.shape[dim] - (expert_block if r.expert else dense_block) * rows)) * numel // r.shape[dim]
        grads += numel * stored if layout.zero == 1 or micro else block * master
        optim += block * (2 * master + (4 if bf16_masters else 0))
    return params, grads, optim


@contextmanager
def fake_world(rank: int, world: int) -> Iterator[None]:
    """A process group of `world` ranks in which this process is `rank`; collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _block_indices(sizes: ParallelSizes, j: int) -> tuple[int, int]:
    """(dense, expert) ZeRO block of the rank at plane index j (= dp rank * tp + tp rank)."""
    d = j // sizes.tp
    return d, (d // sizes.ep if sizes.expert_tp else j // sizes.ep)


def rank_memory(cfg: ModelConfig, layout: Layout) -> list[RankMemory]:
    """Every rank's memory, by rank: each stage's part built as its ranks build it (on the meta device, under a fake
    process group of the world's size)."""
    sizes = layout.sizes
    rows: list[RankMemory] = []
    for stage in range(sizes.pp):
        with fake_world(stage * sizes.plane, sizes.world_size):  # the stage's first rank stands for the stage
            parallel = ParallelLayout.build(sizes, "cpu") if sizes.world_size > 1 else ParallelLayout(sizes)
            with torch.device("meta"):
                model = cfg.build().to(PARAM_DTYPES[layout.precision])
            keep_share(model, parallel, layout.virtual_stages, layout.sequence_parallel, layout.extra_slots)
        records, activations = records_of(model), activation_bytes(cfg, layout, stage)
        for j in range(sizes.plane):
            rows.append(RankMemory(stage * sizes.plane + j, stage, *state_bytes(records, layout, *_block_indices(sizes, j)), activations))
    return rows


class ModelTable:
    """The records of a whole model cut for `tp` tensor-parallel ranks (sequence parallelism and expert tensor
    parallelism as given), each with the layer it belongs to ("embed" and "head" for the ends), to price any layout
    of those without building it again: `stage_records(layout, stage)` is what `rank_memory` counts for that stage.
    `matrix_weights[i]`: this rank's weights in the matrices layer i applies to each of its tokens (attention
    projections, the dense FFN or the shared experts; not the router, not the routed experts), for the cost model."""

    def __init__(self, cfg: ModelConfig, tp: int, sequence_parallel: bool, expert_tp: bool, precision: str) -> None:
        self.cfg = cfg
        with fake_world(0, tp) if tp > 1 else nullcontext():  # none to build uncut (also inside a live group)
            with torch.device("meta"):
                model = cfg.build().to(PARAM_DTYPES[precision])
            if tp > 1:
                model.shard_tensor_parallel(dist.group.WORLD, sequence_parallel)
                for layer in model.moe_layers():
                    layer.shard_tensor_parallel(dist.group.WORLD, sequence_parallel, expert_tp)
        expert = expert_param_ids(model)
        self.records: list[tuple[str | int, ParamRecord]] = []
        self._stages: dict[tuple, list[ParamRecord]] = {}  # stage_records by (pp, virtual stages, stage, slots)
        self.matrix_weights = dict.fromkeys(range(cfg.n_layers), 0)
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            where = int(name.split(".")[1]) if name.startswith("blocks.") else ("head" if name.startswith(("ln_f", "lm_head")) else "embed")
            self.records.append((where, _record(t, id(t) in expert)))
            matrix = isinstance(t, nn.Parameter) and t.dim() >= 2 and id(t) not in expert and ".router." not in name
            if isinstance(where, int) and matrix:
                self.matrix_weights[where] += t.numel()

    def stage_records(self, layout: Layout, stage: int) -> list[ParamRecord]:
        sizes, cfg = layout.sizes, self.cfg
        slots = cfg.moe.num_experts // sizes.ep + (layout.extra_slots if sizes.world_size > 1 else 0)  # as keep_share
        key = (sizes.pp, layout.virtual_stages, stage, slots)
        if key not in self._stages:
            chunks = [stage + i * sizes.pp for i in range(layout.virtual_stages)]
            per = cfg.n_layers // (sizes.pp * layout.virtual_stages)
            layers = {i for c in chunks for i in range(c * per, (c + 1) * per)}
            last = sizes.pp * layout.virtual_stages - 1 in chunks
            tied = last and getattr(cfg, "tie_embeddings", False)  # the head's copy of the embedding (DecoderLM)
            keep = layers | ({"embed"} if 0 in chunks or tied else set()) | ({"head"} if last else set())
            self._stages[key] = [replace(r, shape=(slots, *r.shape[1:])) if r.expert else r
                                 for where, r in self.records if where in keep]
        return self._stages[key]


def merge(rows: list[RankMemory]) -> list[RankMemory]:
    """Ranks of a stage with equal figures as one row (the first rank, and their count)."""
    merged: dict[tuple, RankMemory] = {}
    for r in rows:
        key = (r.stage, r.params_bytes, r.grads_bytes, r.optimizer_bytes, r.activations_bytes)
        if key in merged:
            m = merged[key]
            merged[key] = RankMemory(m.rank, m.stage, m.params_bytes, m.grads_bytes, m.optimizer_bytes, m.activations_bytes, m.count + 1)
        else:
            merged[key] = r
    return sorted(merged.values(), key=lambda r: (r.stage, r.rank))


def largest(rows: list[RankMemory]) -> RankMemory:
    return max(rows, key=lambda r: r.total_bytes)


def report(rows: list[RankMemory]) -> dict:
    """The dry run's JSON: every rank (merged by equal figures) and the largest total."""
    return {"ranks": [r.as_dict() for r in merge(rows)], "max_total_bytes": largest(rows).total_bytes}


def table(rows: list[RankMemory]) -> str:
    """Every rank (merged by equal figures), in GiB."""
    rows, gib = merge(rows), 2**30
    lines = [f"{'rank':>6} {'count':>5} {'stage':>5} {'params':>9} {'grads':>9} {'optimizer':>9} {'activ.':>9} {'total':>9}  GiB"]
    for r in rows:
        lines.append(f"{r.rank:>6} {r.count:>5} {r.stage:>5} {r.params_bytes / gib:>9.2f} {r.grads_bytes / gib:>9.2f} "
                     f"{r.optimizer_bytes / gib:>9.2f} {r.activations_bytes / gib:>9.2f} {r.total_bytes / gib:>9.2f}")
    return "\n".join(lines)
