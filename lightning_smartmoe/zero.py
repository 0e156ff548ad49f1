"""Sharded optimizer state (ZeRO stage 1) and gradients (stage 2) over the data-parallel replicas.

Each parameter is cut along one dimension into n row blocks for the n ranks that hold copies of it (its
reduction group: the data-parallel ranks for dense parameters, the expert-data-parallel ranks for experts);
rank q owns rows [q * rows, q * rows + length(q)), rows = ceil(size / n), as torch.chunk and DTensor cut. The
optimizer steps only the rank's block (its `master`), so its state is 1/n of the parameter's; after the step
every rank's updated block is all-gathered back into the full parameter. At stage 1 the gradients are all-reduced
as without sharding and the master's gradient is its block of the full one; at stage 2 they are reduce-scattered
(GradientSynchronizer) and the full gradient is freed once sent. The master is a view of the parameter, except
under bf16-mixed, where every parameter is stored in bf16 for compute and the master is an fp32 copy of its
block (of the whole parameter, for those not cut), so the fp32 master weights are sharded with the optimizer
state. An expert stack [slots, ...] is cut along a
dimension of each slot's tensor, so every slot keeps its own block of state on every rank of its group: ranks of
one expert-parallel group share their expert-data-parallel index, so they hold the same blocks and a migrated
slot takes its state with it. The cut dimension is never the tensor-parallel one; parameters that cannot be
cut otherwise (a 1-D tensor-parallel bias) or whose gradient is partial over tensor parallelism (the router,
norms under sequence parallelism) stay whole.

Why not torch's own: ZeroRedundancyOptimizer places whole parameters on ranks, so a stacked expert tensor's
state would live on one rank of its group, away from the slots that migrate, and it shards neither
gradients (stage 2) nor over more than one process group; FSDP2's fully_shard shards the parameters
themselves (stage 3) as DTensors and reduce-scatters from its own hooks, which would replace the strategy's
gradient buckets (one group per kind of parameter, the tensor-parallel-partial sum over a stage included),
the per-slot expert indexing of dispatch, migration and the replica exchange, and the plain tensor-parallel
shards. Stage 3 is not offered for the same reason.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

STAGES = (0, 1, 2)


def cut_dim(shape: tuple[int, ...], tp_dim: int | None, expert: bool) -> int | None:
    """The dimension to cut of a parameter of `shape`: its largest that is not tensor-parallel (`tp_dim`; for an
    expert stack, not the slot dimension either); None if there is none."""
    dims = [d for d in range(1 if expert else 0, len(shape)) if d != tp_dim]
    return max(dims, key=lambda d: shape[d]) if dims else None


@dataclass
class Shard:
    """One parameter cut over a group of n ranks; this rank is `rank` of them."""

    param: nn.Parameter
    dim: int
    n: int
    rank: int
    group: dist.ProcessGroup
    master: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.master = self.block(self.param.detach(), self.rank)

    @property
    def rows(self) -> int:
        return math.ceil(self.param.shape[self.dim] / self.n)

    def length(self, q: int) -> int:
        return max(0, min(self.rows, self.param.shape[self.dim] - q * self.rows))

    def block(self, t: Tensor, q: int) -> Tensor:
        """Rank q's rows of t (shaped like the parameter): a view."""
        return t.narrow(self.dim, min(q * self.rows, t.shape[self.dim]), self.length(q))

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(self.rows if d == self.dim else s for d, s in enumerate(self.param.shape))

    @property
    def padded_numel(self) -> int:
        return math.prod(self.padded_shape)

    def pack(self, t: Tensor | None, out: Tensor, q: int) -> None:
        """Write rank q's block of t (None: zeros) into the flat `out` of padded_numel elements, zero-padded."""
        view = out.view(self.padded_shape)
        if t is None or self.length(q) < self.rows:
            out.zero_()
        if t is not None:
            view.narrow(self.dim, 0, self.length(q)).copy_(self.block(t, q))

    def unpack(self, flat: Tensor, q: int) -> Tensor:
        """Rank q's block from its padded flat form (a view)."""
        return flat.view(self.padded_shape).narrow(self.dim, 0, self.length(q))

    def use_fp32_master(self) -> None:
        """Keep the parameter in bf16 and step an fp32 copy of this rank's block instead (bf16-mixed)."""
        self.master = self.block(self.param.detach(), self.rank).float().contiguous()
        self.param.data = self.param.data.to(torch.bfloat16)

    @property
    def master_is_view(self) -> bool:
        return self.master.dtype == self.param.dtype


class ZeroOptimizer:
    """The stage-1/2 bookkeeping of one strategy: which parameters are cut (`shards`), their masters in the
    optimizers, their gradients, and the all-gather after each step; under bf16 masters, also the fp32 masters of
    the parameters not cut (`whole`: blocks of one). `groups` are (parameters, reduction group, whether they may
    be cut) triples."""

    def __init__(self, stage: int, groups: Iterable[tuple[list[nn.Parameter], dist.ProcessGroup | None, bool]],
                 expert_params: set[int], bf16_masters: bool, bucket_bytes: int) -> None:
        self.stage, self.bucket_bytes = stage, bucket_bytes
        self.shards: dict[int, Shard] = {}
        self.whole: dict[int, Shard] = {}
        for params, group, cuttable in groups:
            n = 1 if group is None else dist.get_world_size(group)
            for p in (p for p in params if p.requires_grad):
                dim = cut_dim(tuple(p.shape), getattr(p, "tp_shard_dim", None), id(p) in expert_params) if n > 1 and cuttable else None
                if dim is not None:
                    self.shards[id(p)] = Shard(p, dim, n, dist.get_rank(group), group)
                elif bf16_masters:
                    self.whole[id(p)] = Shard(p, 0, 1, 0, group)
        if bf16_masters:
            for shard in (*self.shards.values(), *self.whole.values()):
                shard.use_fp32_master()

    def master(self, p: Tensor) -> Tensor:
        """The tensor the optimizer steps for parameter p (p itself when p is neither cut nor given a master)."""
        shard = self.shards.get(id(p), self.whole.get(id(p)))
        return p if shard is None else shard.master

    def shard_optimizers(self, optimizers: list[Optimizer]) -> None:
        """Point every optimizer at the masters instead of the cut parameters (before its first step). A group
        that holds a column block (a view that is not contiguous) is no longer fused: torch 2.13's fused CPU
        AdamW steps such a view as if it were contiguous (wrong values, measured)."""
        for opt in optimizers:
            for group in opt.param_groups:
                group["params"] = [self.master(p) for p in group["params"]]
                if group.get("fused") and not all(t.is_contiguous() for t in group["params"]):
                    group["fused"] = False

    def set_master_grads(self) -> None:
        """After the gradients are synchronised: each master's gradient is its block of the parameter's (at stage 2
        only the whole masters', the blocks come reduce-scattered); the full one is dropped (the optimizer's
        zero_grad sees only the masters)."""
        for shard in (*self.shards.values(), *self.whole.values()) if self.stage == 1 else self.whole.values():
            g = shard.param.grad
            shard.master.grad = None if g is None else shard.block(g, shard.rank).to(shard.master.dtype, memory_format=torch.contiguous_format, copy=True)
            shard.param.grad = None

    @torch.no_grad()
    def gather_params(self) -> None:
        """After a step: every rank's updated block back into the full parameters (one all-gather per bucket of
        parameters of one group and dtype)."""
        buckets: dict[tuple[int, torch.dtype], list[list[Shard]]] = {}
        for shard in self.shards.values():
            runs = buckets.setdefault((id(shard.group), shard.param.dtype), [[]])
            if runs[-1] and sum(s.padded_numel for s in runs[-1]) * shard.param.element_size() > self.bucket_bytes:
                runs.append([])
            runs[-1].append(shard)
        for runs in buckets.values():
            for run in runs:
                self._gather(run)
        for shard in self.whole.values():
            shard.param.data.copy_(shard.master)

    @staticmethod
    def _gather(run: list[Shard]) -> None:
        n, rank, group = run[0].n, run[0].rank, run[0].group
        size = sum(s.padded_numel for s in run)
        send = run[0].param.new_empty(size)
        offset = 0
        for s in run:
            out = send[offset : offset + s.padded_numel]
            if s.master_is_view:
                s.pack(s.param.detach(), out, rank)
            else:
                out.view(s.padded_shape).narrow(s.dim, 0, s.length(rank)).copy_(s.master)
            offset += s.padded_numel
        received = send.new_empty(n * size)
        all_gather_single(received, send, group=group)
        for q in range(n):
            offset = q * size
            for s in run:
                if q != rank or not s.master_is_view:
                    s.block(s.param.data, q).copy_(s.unpack(received[offset : offset + s.padded_numel], q))
                offset += s.padded_numel
