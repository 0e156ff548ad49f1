"""Decoder-only GPT with a mixture-of-experts FFN every `moe.every` layers (nanoGPT-style: LayerNorm, learned
positions, GELU), SmartMoE's GPT-MoE. The parallel protocol is the shared one (models/decoder.py)."""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe import init, recompute
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.mlp import GeluMLP
from lightning_smartmoe.models.decoder import Block, DecoderLM, check_divisible
from lightning_smartmoe.moe import MoEConfig, MoELayer
from lightning_smartmoe.moe.experts import default_out_std
from lightning_smartmoe.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    rank_random,
    scatter_to_sequence,
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

    dense_activation = "gelu"  # of the dense FFN layers

    def is_moe_layer(self, i: int) -> bool:
        return self.moe.is_moe_layer(i)

    def build(self) -> "GPTMoE":
        return GPTMoE(self)

    def check_parallel(self, tp: int, pp: int, expert_tp: bool = False, virtual_stages: int = 1) -> None:
        """Raise ConfigError unless the model can be sharded over tp ranks (each expert too, with expert_tp)
        and cut into pp * virtual_stages stages."""
        check_divisible(self, tp, pp, expert_tp, virtual_stages)


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


def _block(cfg: GPTMoEConfig, moe: bool) -> Block:
    out_std = default_out_std(cfg.n_layers)
    ffn = MoELayer(cfg.d_model, cfg.hidden, cfg.moe, out_std) if moe else GeluMLP(cfg.d_model, cfg.hidden, out_std)
    return Block(nn.LayerNorm(cfg.d_model), CausalSelfAttention(cfg), nn.LayerNorm(cfg.d_model), ffn, cfg.dropout,
                 cfg.recompute == "full")


class GPTMoE(DecoderLM):
    """forward(idx [B, S] int64) -> (logits [B, S, vocab], summed MoE aux loss []); see DecoderLM. Besides the
    token embedding, the first pipeline stage keeps the learned positions `pos_emb`."""

    _first_stage_extras = ("pos_emb",)

    def __init__(self, cfg: GPTMoEConfig) -> None:
        blocks = {str(i): _block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers)}
        super().__init__(cfg, blocks, nn.LayerNorm(cfg.d_model))
        self.pos_emb: nn.Embedding | None = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self._declare_init()

    def _declare_init(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) for linear and embedding weights, residual-branch output projections
        scaled by 1 / sqrt(2 n_layers), zero biases, unit layer-norm gains (the MoE layers declare their own)."""
        for module in self.dense_modules(nn.Module):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("ffn.proj.weight"):
                init.normal_(p, std=default_out_std(self.cfg.n_layers))

    def _shardable(self) -> list[nn.Module]:
        return self.dense_modules(CausalSelfAttention, GeluMLP)

    def embed(self, idx: Tensor) -> Tensor:
        """Token ids [B, S] -> hidden [B, S, d] (under sequence parallelism, this rank's [B, S/tp, d])."""
        s = idx.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence length {s} exceeds model.seq_len={self.cfg.seq_len}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(s, device=idx.device)))
        return scatter_to_sequence(x, self.tp_group) if self.sequence_parallel else x
