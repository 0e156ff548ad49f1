"""Decoder-only GPT with a mixture-of-experts FFN every `moe.every` layers (nanoGPT-style)."""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.moe import MoEConfig, MoELayer
from lightning_smartmoe.moe.experts import default_out_std


@dataclass
class GPTMoEConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    ffn_hidden: int | None = None  # dense FFN hidden size; None = 4 * d_model
    dropout: float = 0.0
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
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


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, x [B, S, d] -> [B, S, d]."""

    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)  # a key bias has no gradient (softmax shift)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class DenseFFN(nn.Module):
    """Two-layer GELU FFN, x [B, S, d] -> ([B, S, d], zero aux loss)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)

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

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self.drop(self.attn(self.ln1(x)))
        y, aux = self.ffn(self.ln2(x))
        return x + self.drop(y), aux


class GPTMoE(nn.Module):
    """forward(idx [B, S] int64) -> (logits [B, S, vocab], summed MoE aux loss [])."""

    def __init__(self, cfg: GPTMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_dense)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("ffn.proj.weight"):
                nn.init.normal_(p, std=default_out_std(cfg.n_layers))

    @staticmethod
    def _init_dense(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        s = idx.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence length {s} exceeds model.seq_len={self.cfg.seq_len}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(s, device=idx.device)))
        aux = x.new_zeros(())
        for block in self.blocks:
            x, block_aux = block(x)
            aux = aux + block_aux
        return self.lm_head(self.ln_f(x)), aux
