"""What the decoder-only models share: the pre-norm residual block and the parallel protocol of the smartmoe
strategy (check_parallel, shard_tensor_parallel, keep_stages, stage_io, forward(x, stage), loss).

A model is built whole (on the meta device under the strategy), then for tensor parallelism sharded
Megatron-style and for pipeline parallelism cut into stages of equal numbers of layers. Parameter names do not
depend on the layout (blocks are keyed by their layer index).
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe import recompute
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.moe import MoELayer
from lightning_smartmoe.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    enter_tp,
    rank_random,
    vocab_parallel_cross_entropy,
)


def check_divisible(cfg, tp: int, pp: int, expert_tp: bool, virtual_stages: int, **need: int) -> None:
    """Raise ConfigError unless model config `cfg`'s heads, vocabulary, sequence, dense FFN and (with expert_tp)
    expert and shared-expert hidden sizes, and every value of `need` (config key -> size) divide by tp, and its
    layers split into pp * virtual_stages stages."""
    need = {"model.n_heads": cfg.n_heads, "model.vocab_size": cfg.vocab_size, "model.seq_len": cfg.seq_len, **need}
    if any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        need["model.ffn_hidden (default 4 x d_model)"] = cfg.hidden
    if expert_tp:
        need["moe.expert_hidden (default model.ffn_hidden)"] = cfg.moe.expert_hidden or cfg.hidden
    if cfg.moe.shared_experts:
        need["moe.shared_expert_hidden"] = cfg.moe.shared_hidden(cfg.moe.expert_hidden or cfg.hidden)
    for key, value in need.items():
        if value % tp:
            raise ConfigError(f"{key}={value} must be divisible by parallel.tp={tp}")
    if cfg.n_layers % (pp * virtual_stages):
        raise ConfigError(
            f"model.n_layers={cfg.n_layers} must be divisible by parallel.pp x parallel.virtual_stages = "
            f"{pp} x {virtual_stages}"
        )


class Block(nn.Module):
    """Pre-norm transformer block; forward(x [B, S, d]) -> (x [B, S, d], aux loss []).

    x + dropout(attn(ln1(x))), then + dropout(ffn(ln2(x))); `ffn` is an MoELayer (returning its aux loss too) or
    a dense FFN. With `recompute` the whole block is recomputed in backward.
    """

    def __init__(self, ln1: nn.Module, attn: nn.Module, ln2: nn.Module, ffn: nn.Module, dropout: float,
                 recompute_block: bool) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.ffn = ln1, attn, ln2, ffn
        self.drop = nn.Dropout(dropout)
        self.recompute = recompute_block
        self.seq_group: dist.ProcessGroup | None = None  # under sequence parallelism: x is this rank's slice

    def _dropout(self, x: Tensor) -> Tensor:
        if not self.training or not self.drop.p:
            return x
        with rank_random(self.seq_group, x.device):
            return self.drop(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return recompute.recomputed(self._forward, x) if self.recompute and self.training else self._forward(x)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self._dropout(self.attn(self.ln1(x)))
        if isinstance(self.ffn, MoELayer):
            y, aux = self.ffn(self.ln2(x))
        else:
            y, aux = self.ffn(self.ln2(x)), x.new_zeros(())
        return x + self._dropout(y), aux


class DecoderLM(nn.Module):
    """forward(idx [B, S] int64) -> (logits [B, S, vocab], summed MoE aux loss []).

    Holds `tok_emb`, `blocks` (Block by layer index), the final norm `ln_f` and `lm_head` (None when the head
    reuses the token embedding's weight: `tie_embeddings`). Subclasses build them and define `embed` (token
    ids -> this rank's hidden states), `_shardable` (the modules with a `shard(tp_group, sequence_parallel)`
    method, besides the embedding and head), `_first_stage_extras` (modules only the first stage keeps besides
    the embedding); `check_parallel` is their config's.

    `shard_tensor_parallel` and `keep_stages` turn the whole model into one rank's part. A pipeline stage after the
    first takes the hidden states [B, S, d] instead of token ids, and one before the last returns hidden states
    instead of logits. Under tensor parallelism the logits are this rank's vocab shard [B, S, vocab / tp]; `loss`
    computes the cross-entropy from the shards. A tied head keeps a copy of the token embedding on the last stage
    when that is not the first, marked `pp_tied`: the strategy sums the two copies' gradients, so they stay equal.
    """

    _first_stage_extras: tuple[str, ...] = ()

    def __init__(self, cfg, blocks: dict[str, Block], ln_f: nn.Module, tie_embeddings: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb: VocabParallelEmbedding | None = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleDict(blocks)
        self.ln_f: nn.Module | None = ln_f
        self.lm_head = None if tie_embeddings else ColumnParallelLinear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_embeddings = tie_embeddings
        self.tp_group: dist.ProcessGroup | None = None
        self.sequence_parallel = False
        self.num_stages = 1
        self.stages: list[int] = [0]  # the pipeline stages this rank keeps

    def _shardable(self) -> list[nn.Module]:
        raise NotImplementedError

    def _residual_norms(self) -> list[nn.Module]:
        """The norms applied to the residual stream (this rank's sequence slice under sequence parallelism)."""
        norms = [m for b in self.blocks.values() for m in (b.ln1, b.ln2)]
        return norms + ([self.ln_f] if self.ln_f is not None else [])

    def check_parallel(self, tp: int, pp: int, expert_tp: bool = False, virtual_stages: int = 1) -> None:
        """Raise ConfigError unless the model can be sharded over tp ranks and cut into pp * virtual_stages stages."""
        self.cfg.check_parallel(tp, pp, expert_tp, virtual_stages)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def dense_modules(self, *types: type) -> list[nn.Module]:
        """This model's modules of `types` outside its MoE layers (which declare their own initialisation and are
        sharded by the strategy's `distribute`)."""
        moe = {id(m) for layer in self.moe_layers() for m in layer.modules()}
        return [m for m in self.modules() if isinstance(m, types) and id(m) not in moe]

    def shard_tensor_parallel(self, tp_group: dist.ProcessGroup, sequence_parallel: bool = False) -> None:
        """Keep this rank's tensor-parallel shard: attention heads, dense FFN columns, vocab rows.

        Parameters whose gradient each TP rank computes from a part of the tokens only (with sequence
        parallelism: the residual-stream norms) get `tp_partial = True`.
        """
        if self.tp_group is tp_group:
            return  # already sharded (a second fit, validate after fit)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        for module in self._shardable():
            module.shard(tp_group, sequence_parallel)
        if self.tok_emb is not None:
            self.tok_emb.shard(tp_group)
        if self.lm_head is not None:
            self.lm_head.shard(tp_group, sequence_parallel)
        if sequence_parallel:
            for norm in self._residual_norms():
                for p in norm.parameters():
                    p.tp_partial = True
            for block in self.blocks.values():
                block.seq_group = tp_group

    def keep_stages(self, stages: list[int], num_stages: int) -> None:
        """Drop everything outside the pipeline stages `stages` of `num_stages` (equal numbers of layers each;
        several stages per rank for an interleaved schedule)."""
        self.num_stages, self.stages = num_stages, sorted(stages)
        kept = {i for stage in stages for i in self.stage_layers(stage)}
        for i in range(self.cfg.n_layers):
            if i not in kept and str(i) in self.blocks:
                del self.blocks[str(i)]
        first, last = 0 in stages, num_stages - 1 in stages
        if not first:
            if not (last and self.tie_embeddings):
                self.tok_emb = None
            for name in self._first_stage_extras:
                setattr(self, name, None)
        if not last:
            self.ln_f = self.lm_head = None
        if self.tie_embeddings and first != last:
            self.tok_emb.weight.pp_tied = True

    def stage_layers(self, stage: int) -> range:
        per = self.cfg.n_layers // self.num_stages
        return range(stage * per, (stage + 1) * per)

    def _is_first(self, stage: int | None) -> bool:
        return 0 in self.stages if stage is None else stage == 0

    def _is_last(self, stage: int | None) -> bool:
        return self.num_stages - 1 in self.stages if stage is None else stage == self.num_stages - 1

    def stage_io(self, batch: int, seq_len: int, stage: int | None = None) -> tuple[Tensor, Tensor]:
        """Meta tensors shaped like pipeline stage `stage`'s input and output (None: of everything kept) for
        [batch, seq_len] token windows, under the current autocast setting; hidden states require grad. The
        schedule then needs no shape-inference forward."""
        tp = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        seq = seq_len // tp if self.sequence_parallel else seq_len
        param = next(self.parameters())
        hidden = torch.empty(batch, seq, self.cfg.d_model, dtype=param.dtype, device="meta", requires_grad=True)
        inp = torch.empty(batch, seq_len, dtype=torch.long, device="meta") if self._is_first(stage) else hidden
        if not self._is_last(stage):
            return inp, hidden
        device = param.device.type
        logits_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else param.dtype
        vocab = self.cfg.vocab_size // tp
        logits = torch.empty(batch, seq_len, vocab, dtype=logits_dtype, device="meta", requires_grad=True)
        return inp, logits

    def embed(self, idx: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, x: Tensor) -> Tensor:
        """Hidden states [B, S, d] (or this rank's sequence slice) -> logits [B, S, vocab / tp]."""
        x = self.ln_f(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return nn.functional.linear(enter_tp(x, self.tp_group, self.sequence_parallel), self.tok_emb.weight)

    def forward(self, x: Tensor, stage: int | None = None) -> tuple[Tensor, Tensor]:
        """Run pipeline stage `stage` (None: everything this rank keeps)."""
        if self._is_first(stage):
            x = self.embed(x)
        blocks = self.blocks.values() if stage is None else [self.blocks[str(i)] for i in self.stage_layers(stage)]
        aux = x.new_zeros(())
        for block in blocks:
            x, block_aux = block(x)
            aux = aux + block_aux
        if not self._is_last(stage):
            return x, aux
        return self.head(x), aux

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean next-token cross-entropy [] of logits [B, S, vocab / tp] against target ids [B, S]."""
        losses = vocab_parallel_cross_entropy(logits.flatten(0, 1), target.flatten(), self.tp_group)
        return losses.mean()
