"""Decoder-only GPT with a mixture-of-experts FFN every `moe.every` layers (nanoGPT-style), built whole (on
the meta device under the smartmoe strategy) and then, for tensor parallelism, sharded Megatron-style, and for
pipeline parallelism, cut into stages."""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe import init, recompute
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.moe import MoEConfig, MoELayer
from lightning_smartmoe.moe.experts import default_out_std
from lightning_smartmoe.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    rank_random,
    scatter_to_sequence,
    vocab_parallel_cross_entropy,
)


@dataclass
class GPTMoEConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    ffn_hidden: int | None = None  # dense FFN hidden size; None = 4 * d_model
    dropout: float = 0.0
    recompute: str = "none"  # none | selective (the attention core) | full (each block); recompute_granularity
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if self.recompute not in recompute.MODES:
            raise ConfigError(f"model.recompute={self.recompute!r} is unknown; allowed: {', '.join(recompute.MODES)}")
        for key in ("vocab_size", "seq_len", "n_layers", "d_model", "n_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 4 * self.d_model

    def is_moe_layer(self, i: int) -> bool:
        """Layers every-1, 2*every-1, ... carry an MoE FFN (all layers when every = 1)."""
        return i % self.moe.every == self.moe.every - 1

    def check_parallel(self, tp: int, pp: int, expert_tp: bool = False, virtual_stages: int = 1) -> None:
        """Raise ConfigError unless the model can be sharded over tp ranks (each expert too, with expert_tp)
        and cut into pp * virtual_stages stages."""
        need = {"model.n_heads": self.n_heads, "model.vocab_size": self.vocab_size, "model.seq_len": self.seq_len}
        if any(not self.is_moe_layer(i) for i in range(self.n_layers)):
            need["model.ffn_hidden (default 4 x d_model)"] = self.hidden
        if expert_tp:
            need["moe.expert_hidden (default model.ffn_hidden)"] = self.moe.expert_hidden or self.hidden
        for key, value in need.items():
            if value % tp:
                raise ConfigError(f"{key}={value} must be divisible by parallel.tp={tp}")
        if self.n_layers % (pp * virtual_stages):
            raise ConfigError(
                f"model.n_layers={self.n_layers} must be divisible by parallel.pp x parallel.virtual_stages = "
                f"{pp} x {virtual_stages}"
            )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, x [B, S, d] -> [B, S, d] (under sequence parallelism [B, S/tp, d] in
    and out). The qkv rows are ordered (head, q|k|v, head_dim), so a tensor-parallel shard is whole heads."""

    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads  # heads on this rank
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        self.recompute = cfg.recompute == "selective"
        self.qkv = ColumnParallelLinear(cfg.d_model, 3 * cfg.d_model, bias=False)  # a key bias has no gradient
        self.proj = RowParallelLinear(cfg.d_model, cfg.d_model)

    def shard(self, tp_group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        self.qkv.shard(tp_group, sequence_parallel)
        self.proj.shard(tp_group, sequence_parallel)
        self.n_heads //= dist.get_world_size(tp_group)

    def forward(self, x: Tensor) -> Tensor:
        h = self.qkv(x)  # [B, S, 3 * local heads * head_dim]
        b, s, _ = h.shape
        q, k, v = h.view(b, s, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        y = recompute.recomputed(self._attend, q, k, v) if self.recompute and self.training else self._attend(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The attention core: q, k, v [B, heads, S, head_dim] -> [B, heads, S, head_dim]."""
        dropout = self.dropout if self.training else 0.0
        with rank_random(self.qkv.tp_group if dropout else None, q.device):  # each rank's own heads
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)


class DenseFFN(nn.Module):
    """Two-layer GELU FFN, x [B, S, d] -> ([B, S, d], zero aux loss); column- then row-parallel under TP."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc = ColumnParallelLinear(d_model, hidden)
        self.proj = RowParallelLinear(hidden, d_model)

    def shard(self, tp_group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        self.fc.shard(tp_group, sequence_parallel)
        self.proj.shard(tp_group, sequence_parallel)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj(nn.functional.gelu(self.fc(x))), x.new_zeros(())


class Block(nn.Module):
    """Pre-norm transformer block; forward(x [B, S, d]) -> (x [B, S, d], aux loss [])."""

    def __init__(self, cfg: GPTMoEConfig, moe: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        out_std = default_out_std(cfg.n_layers)
        self.ffn = MoELayer(cfg.d_model, cfg.hidden, cfg.moe, out_std) if moe else DenseFFN(cfg.d_model, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.recompute = cfg.recompute == "full"
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
        y, aux = self.ffn(self.ln2(x))
        return x + self._dropout(y), aux


class GPTMoE(nn.Module):
    """forward(idx [B, S] int64) -> (logits [B, S, vocab], summed MoE aux loss []).

    `shard_tensor_parallel` and `keep_stages` turn the whole model into one rank's part. A pipeline stage
    after the first takes the hidden states [B, S, d] instead of token ids, and one before the last
    returns hidden states instead of logits. Under tensor parallelism the logits are this rank's vocab
    shard [B, S, vocab / tp]; `loss` computes the cross-entropy from the shards. Parameter names do not
    depend on the layout (blocks are keyed by their layer index).
    """

    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb: VocabParallelEmbedding | None = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb: nn.Embedding | None = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers)})
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(cfg.d_model)
        self.lm_head: ColumnParallelLinear | None = ColumnParallelLinear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tp_group: dist.ProcessGroup | None = None
        self.sequence_parallel = False
        self.num_stages = 1
        self._declare_init()

    def _declare_init(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) for linear and embedding weights, residual-branch output projections
        scaled by 1 / sqrt(2 n_layers), zero biases, unit layer-norm gains (the MoE layers declare their own)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("ffn.proj.weight"):
                init.normal_(p, std=default_out_std(self.cfg.n_layers))

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def check_parallel(self, tp: int, pp: int, expert_tp: bool = False, virtual_stages: int = 1) -> None:
        self.cfg.check_parallel(tp, pp, expert_tp, virtual_stages)

    def shard_tensor_parallel(self, tp_group: dist.ProcessGroup, sequence_parallel: bool = False) -> None:
        """Keep this rank's tensor-parallel shard: attention heads, dense FFN columns, vocab rows.

        Parameters whose gradient each TP rank computes from a part of the tokens only (with sequence
        parallelism: the layer norms) get `tp_partial = True`.
        """
        if self.tp_group is tp_group:
            return  # already sharded (a second fit, validate after fit)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        for module in self.modules():
            if isinstance(module, (CausalSelfAttention, DenseFFN)):
                module.shard(tp_group, sequence_parallel)
        if self.tok_emb is not None:
            self.tok_emb.shard(tp_group)
        if self.lm_head is not None:
            self.lm_head.shard(tp_group, sequence_parallel)
        if sequence_parallel:
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.tp_partial = module.bias.tp_partial = True
                elif isinstance(module, Block):
                    module.seq_group = tp_group

    def keep_stages(self, stages: list[int], num_stages: int) -> None:
        """Drop everything outside the pipeline stages `stages` of `num_stages` (equal numbers of layers each;
        several stages per rank for an interleaved schedule)."""
        self.num_stages = num_stages
        kept = {i for stage in stages for i in self.stage_layers(stage)}
        for i in range(self.cfg.n_layers):
            if i not in kept and str(i) in self.blocks:
                del self.blocks[str(i)]
        if 0 not in stages:
            self.tok_emb = self.pos_emb = None
        if num_stages - 1 not in stages:
            self.ln_f = self.lm_head = None

    def stage_layers(self, stage: int) -> range:
        per = self.cfg.n_layers // self.num_stages
        return range(stage * per, (stage + 1) * per)

    def _is_first(self, stage: int | None) -> bool:
        return self.tok_emb is not None if stage is None else stage == 0

    def _is_last(self, stage: int | None) -> bool:
        return self.lm_head is not None if stage is None else stage == self.num_stages - 1

    def stage_io(self, batch: int, seq_len: int, stage: int | None = None) -> tuple[Tensor, Tensor]:
        """Meta tensors shaped like pipeline stage `stage`'s input and output (None: of everything kept) for
        [batch, seq_len] token windows, under the current autocast setting; hidden states require grad. The
        schedule then needs no shape-inference forward."""
        tp = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        seq = seq_len // tp if self.sequence_parallel else seq_len
        dtype = next(self.parameters()).dtype
        hidden = torch.empty(batch, seq, self.cfg.d_model, dtype=dtype, device="meta", requires_grad=True)
        inp = torch.empty(batch, seq_len, dtype=torch.long, device="meta") if self._is_first(stage) else hidden
        if not self._is_last(stage):
            return inp, hidden
        device = self.lm_head.weight.device.type
        logits_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        logits = torch.empty(batch, seq_len, self.lm_head.out_features, dtype=logits_dtype, device="meta", requires_grad=True)
        return inp, logits

    def embed(self, idx: Tensor) -> Tensor:
        """Token ids [B, S] -> hidden [B, S, d] (under sequence parallelism, this rank's [B, S/tp, d])."""
        s = idx.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence length {s} exceeds model.seq_len={self.cfg.seq_len}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(s, device=idx.device)))
        return scatter_to_sequence(x, self.tp_group) if self.sequence_parallel else x

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
        return self.lm_head(self.ln_f(x)), aux

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean next-token cross-entropy [] of logits [B, S, vocab / tp] against target ids [B, S]."""
        losses = vocab_parallel_cross_entropy(logits.flatten(0, 1), target.flatten(), self.tp_group)
        return losses.mean()
