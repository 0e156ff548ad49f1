"""Megatron-style tensor parallelism over a TP process group.

A column-parallel linear splits its output features over the TP ranks, a row-parallel linear its
input features; chained (column -> elementwise -> row) they need one all-reduce forward and one
backward. With `sequence_parallel` the activations outside the pair are split along the sequence
(dim 1) instead of replicated, and the all-reduces become an all-gather and a reduce-scatter.
Every layer is built at full size (on the meta device, or with the single-process model's values) and then
`shard`-ed; sharded parameters carry `tp_shard_dim`, the dim they are split along. `group=None` means one TP rank: no
communication.
"""

from collections.abc import Callable, Generator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_smartmoe.init import new_parameter

# gloo has the flat reduce-scatter since torch 2.2 (as all-reduce + chunk) but the list form only since 2.8;
# newer torch renames reduce_scatter_tensor to reduce_scatter_single. All-gathers use the list form (any torch).
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _tp_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _shard_size(total: int, tp: int, what: str) -> int:
    """Size of one of `tp` equal shards of `total`; ValueError naming `what` if it does not divide."""
    if total % tp:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {tp}")
    return total // tp


def _all_reduce(x: Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> Tensor:
    """Reduced copy of x over the group (x itself is left alone)."""
    x = x.clone(memory_format=torch.contiguous_format)
    if _tp_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    """Concatenate every rank's x (same shape on all ranks) along dim."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_tp_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim)


def _reduce_scatter(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    """This rank's chunk along dim of the sum of every rank's x."""
    size = _shard_size(x.shape[dim], _tp_size(group), f"dim {dim} of the reduce-scatter input")
    x = x.movedim(dim, 0).contiguous()  # the flat collective scatters along dim 0
    out = x.new_empty((size, *x.shape[1:]))
    _reduce_scatter_single(out, x, group=group)
    return out.movedim(0, dim).contiguous()


def _split(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    """This rank's contiguous chunk of x along dim."""
    size = _shard_size(x.shape[dim], _tp_size(group), f"dim {dim} of the sequence-parallel split")
    return x.narrow(dim, _tp_rank(group) * size, size).contiguous()


class _Communicate(torch.autograd.Function):
    """y = forward(x); in backward, grad_x = backward(grad_y) (one collective each way, or none)."""

    @staticmethod
    def forward(ctx, x: Tensor, forward: Callable[[Tensor], Tensor], backward: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.backward_fn = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return ctx.backward_fn(grad), None, None


def _communicate(x: Tensor, group: dist.ProcessGroup | None, forward: Callable, backward: Callable) -> Tensor:
    return x if _tp_size(group) == 1 else _Communicate.apply(x, forward, backward)


def copy_to_tp(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Enter a TP region with a replicated x: forward identity, backward all-reduce(sum)."""
    return _communicate(x, group, lambda t: t.view_as(t), lambda g: _all_reduce(g, group))


def reduce_from_tp(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Leave a TP region by summing partial results: forward all-reduce(sum), backward identity."""
    return _communicate(x, group, lambda t: _all_reduce(t, group), lambda g: g)


def sum_over_tp(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Inside a TP region, the sum of every rank's partial x, which each rank then uses for its own part: forward
    and backward all-reduce(sum) (e.g. a norm over features split across the ranks)."""
    return _communicate(x, group, lambda t: _all_reduce(t, group), lambda g: _all_reduce(g, group))


def scatter_to_sequence(x: Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> Tensor:
    """Replicated [.., S, ..] -> this rank's [.., S/tp, ..]; backward all-gathers the gradient."""
    return _communicate(x, group, lambda t: _split(t, group, dim), lambda g: _all_gather(g, group, dim))


def gather_from_sequence(x: Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> Tensor:
    """[.., S/tp, ..] -> replicated [.., S, ..]; backward keeps this rank's chunk of the gradient."""
    return _communicate(x, group, lambda t: _all_gather(t, group, dim), lambda g: _split(g, group, dim))


def all_gather_sequence(x: Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> Tensor:
    """[.., S/tp, ..] -> [.., S, ..] before a column-parallel linear; backward reduce-scatter(sum)."""
    return _communicate(x, group, lambda t: _all_gather(t, group, dim), lambda g: _reduce_scatter(g, group, dim))


def reduce_scatter_sequence(x: Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> Tensor:
    """Partial [.., S, ..] -> summed [.., S/tp, ..] after a row-parallel linear; backward all-gather."""
    return _communicate(x, group, lambda t: _reduce_scatter(t, group, dim), lambda g: _all_gather(g, group, dim))


_RANK_RANDOM: dict[tuple[dist.ProcessGroup, torch.device], Tensor] = {}  # each rank's own generator state


def rank_random_state() -> dict[tuple[dist.ProcessGroup, torch.device], Tensor]:
    """A snapshot of every rank_random stream (to replay a region's draws, as recomputation does)."""
    return dict(_RANK_RANDOM)


def set_rank_random_state(state: dict[tuple[dist.ProcessGroup, torch.device], Tensor]) -> None:
    _RANK_RANDOM.clear()
    _RANK_RANDOM.update(state)


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@contextmanager
def rank_random(group: dist.ProcessGroup | None, device: torch.device) -> Generator[None, None, None]:
    """Inside, random numbers on `device` come from a stream of this rank's own (seeded with the initial seed
    + 2718 + its rank in `group`), for tensors that differ across the TP ranks (attention heads, sequence or
    token slices); outside, the default stream, which replicated regions use, advances as if nothing was drawn,
    so it stays the same on every rank. A no-op for one TP rank."""
    if _tp_size(group) == 1:
        yield
        return
    key = (group, device)
    if key not in _RANK_RANDOM:
        own = torch.Generator(device=device)
        own.manual_seed(torch.initial_seed() + 2718 + _tp_rank(group))
        _RANK_RANDOM[key] = own.get_state()
    saved = _rng_state(device)
    _set_rng_state(_RANK_RANDOM[key], device)
    try:
        yield
    finally:
        _RANK_RANDOM[key] = _rng_state(device)
        _set_rng_state(saved, device)


def _shard_param(param: nn.Parameter, dim: int, group: dist.ProcessGroup) -> nn.Parameter:
    """This rank's contiguous block of param along dim, marked with `tp_shard_dim` (works on the meta device)."""
    size = param.shape[dim] // _tp_size(group)
    shard = new_parameter(param.detach().narrow(dim, _tp_rank(group) * size, size).clone(), param)
    shard.tp_shard_dim = dim
    return shard


class ColumnParallelLinear(nn.Linear):
    """nn.Linear whose output features are split over the TP ranks: [..., in] -> [..., out/tp]."""

    tp_group: dist.ProcessGroup | None = None
    sequence_parallel: bool = False

    def shard(self, group: dist.ProcessGroup | None, sequence_parallel: bool = False) -> "ColumnParallelLinear":
        """Keep this rank's rows: weight [out/tp, in], bias [out/tp]. Returns self."""
        self.tp_group, self.sequence_parallel = group, sequence_parallel
        if _tp_size(group) > 1:
            self.out_features = _shard_size(self.out_features, _tp_size(group), "out_features")
            self.weight = _shard_param(self.weight, 0, group)
            if self.bias is not None:
                self.bias = _shard_param(self.bias, 0, group)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in] replicated, or [B, S/tp, in] with sequence_parallel. Returns [..., out/tp]."""
        return self.project(enter_tp(x, self.tp_group, self.sequence_parallel))

    def project(self, x: Tensor) -> Tensor:
        """This rank's output features for x [..., in] that has already entered the TP region (`enter_tp`), as when
        several linears read one input: it enters once."""
        return F.linear(x, self.weight, self.bias)


def enter_tp(x: Tensor, group: dist.ProcessGroup | None, sequence_parallel: bool) -> Tensor:
    """Enter a TP region: x [..., d] replicated (forward identity, backward all-reduce) or, with sequence
    parallelism, this rank's [B, S/tp, d] (all-gathered to [B, S, d]; backward reduce-scatter)."""
    return all_gather_sequence(x, group, dim=1) if sequence_parallel else copy_to_tp(x, group)


class ReplicatedLinear(ColumnParallelLinear):
    """A linear inside a TP region whose whole weight every TP rank holds (its input entered as for a
    column-parallel linear): each rank's gradient is its own part of the region's, so the weight (and bias) are
    `tp_partial`. E.g. the shared key/value compression of multi-head latent attention."""

    def shard(self, group: dist.ProcessGroup | None, sequence_parallel: bool = False) -> "ReplicatedLinear":
        self.tp_group, self.sequence_parallel = group, sequence_parallel
        if _tp_size(group) > 1:
            for p in self.parameters():
                p.tp_partial = True
        return self


class RowParallelLinear(nn.Linear):
    """nn.Linear whose input features are split over the TP ranks: [..., in/tp] -> [..., out]."""

    tp_group: dist.ProcessGroup | None = None
    sequence_parallel: bool = False

    def shard(self, group: dist.ProcessGroup | None, sequence_parallel: bool = False) -> "RowParallelLinear":
        """Keep this rank's columns: weight [out, in/tp]; the bias stays full and replicated. Returns self."""
        self.tp_group, self.sequence_parallel = group, sequence_parallel
        if _tp_size(group) > 1:
            self.in_features = _shard_size(self.in_features, _tp_size(group), "in_features")
            self.weight = _shard_param(self.weight, 1, group)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in/tp]. Returns [..., out] replicated, or [B, S/tp, out] with sequence_parallel."""
        y = F.linear(x, self.weight)
        bias = self.bias
        if self.sequence_parallel:
            y = reduce_scatter_sequence(y, self.tp_group, dim=1)
            if bias is not None:  # each rank adds it to its own tokens only: sum its gradient over TP
                bias = copy_to_tp(bias, self.tp_group)
        else:
            y = reduce_from_tp(y, self.tp_group)
        return y if bias is None else y + bias


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding with its vocabulary split over the TP ranks: rank r holds ids [r*V/tp, (r+1)*V/tp)."""

    tp_group: dist.ProcessGroup | None = None
    vocab_start: int = 0

    def shard(self, group: dist.ProcessGroup | None) -> "VocabParallelEmbedding":
        """Keep this rank's rows: weight [V/tp, d]. Returns self."""
        self.tp_group = group
        if _tp_size(group) > 1:
            if self.max_norm is not None or self.scale_grad_by_freq:
                raise ValueError("VocabParallelEmbedding supports neither max_norm nor scale_grad_by_freq")
            rows = _shard_size(self.num_embeddings, _tp_size(group), "num_embeddings")
            self.vocab_start, self.num_embeddings = _tp_rank(group) * rows, rows
            if self.padding_idx is not None:
                local = self.padding_idx - self.vocab_start
                self.padding_idx = local if 0 <= local < rows else None
            self.weight = _shard_param(self.weight, 0, group)
        return self

    def forward(self, idx: Tensor) -> Tensor:
        """idx: [B, S] global ids. Returns [B, S, d], replicated over TP."""
        if _tp_size(self.tp_group) == 1:
            return super().forward(idx)
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight, self.padding_idx, sparse=self.sparse)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0), self.tp_group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        x = x - _all_reduce(x.max(-1).values, group, dist.ReduceOp.MAX).unsqueeze(-1)
        local = target - _tp_rank(group) * x.shape[-1]
        inside = (local >= 0) & (local < x.shape[-1])
        local = local.masked_fill(~inside, 0)
        target_logit = x.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0)
        exp = x.exp()
        sum_exp, target_logit = _all_reduce(torch.stack([exp.sum(-1), target_logit]), group)  # one all-reduce
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, inside)
        ctx.logits_dtype = logits.dtype
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        softmax, local, inside = ctx.saved_tensors
        grad_logits = softmax.scatter_add(-1, local.unsqueeze(-1), -inside.to(softmax.dtype).unsqueeze(-1))
        return (grad_logits * grad.unsqueeze(-1)).to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Per-token cross entropy with the vocabulary split over TP, never gathering the full logits.

    Args:
        logits: [N, V/tp] this rank's vocabulary shard (rank r holds ids [r*V/tp, (r+1)*V/tp)).
        target: [N] int64 global ids.
        group: the TP group.

    Returns:
        [N] loss, in at least fp32, identical on every TP rank.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, group)
