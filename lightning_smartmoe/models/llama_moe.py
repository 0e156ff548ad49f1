"""Llama-style decoder with a mixture-of-experts FFN every `moe.every` layers: RMSNorm, rotary positions,
grouped-query attention (or DeepSeek's multi-head latent attention), SwiGLU dense layers, an untied or tied head.
The shapes of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2 (lightning_smartmoe.interop reads and writes
their Hugging Face checkpoints). The parallel protocol is the shared one (models/decoder.py)."""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_smartmoe import init, recompute
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.mlp import SwiGLUMLP
from lightning_smartmoe.models.decoder import Block, DecoderLM, check_divisible
from lightning_smartmoe.moe import MoEConfig, MoELayer
from lightning_smartmoe.moe.experts import default_out_std
from lightning_smartmoe.tensor_parallel import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    enter_tp,
    rank_random,
    scatter_to_sequence,
    sum_over_tp,
)

ATTENTIONS = ("gqa", "mla")
QK_NORMS = ("none", "head", "full")
ROPE_TYPES = ("default", "yarn")


@dataclass
class LlamaMoEConfig:
    vocab_size: int = 256
    seq_len: int = 128  # training window (positions 0 .. seq_len - 1)
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads; None = n_heads
    head_dim: int | None = None  # None = d_model // n_heads
    ffn_hidden: int | None = None  # dense SwiGLU hidden size; None = 4 * d_model
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | yarn (the rope_yarn_* keys)
    rope_yarn_factor: float = 1.0
    rope_yarn_original_seq_len: int = 4096  # positions the model was pretrained on
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_yarn_mscale: float = 1.0
    rope_yarn_mscale_all_dim: float = 0.0
    tie_embeddings: bool = False  # the head reuses the token embedding's weight
    qkv_bias: bool = False  # biases on the query/key/value projections (mla: on q_a_proj and kv_a_proj)
    o_bias: bool = False  # bias on the attention output projection
    qk_norm: str = "none"  # none | head (RMSNorm per head, Qwen3) | full (over all heads' features, OLMoE)
    attention: str = "gqa"  # gqa | mla (multi-head latent attention, DeepSeek-V2; the mla_* keys)
    mla_q_lora_rank: int | None = None  # None: queries projected directly
    mla_kv_lora_rank: int = 64
    mla_qk_nope_head_dim: int = 32
    mla_qk_rope_head_dim: int = 16
    mla_v_head_dim: int = 32
    dropout: float = 0.0
    recompute: str = "none"  # none | selective (the attention core) | full (each block)
    init_from: str | None = None  # hf:DIR: start from a Hugging Face checkpoint (its shapes replace these)
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(activation="swiglu"))

    def __post_init__(self) -> None:
        for key in ("vocab_size", "seq_len", "n_layers", "d_model", "n_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
        for key, allowed in (("recompute", recompute.MODES), ("qk_norm", QK_NORMS), ("attention", ATTENTIONS),
                             ("rope_type", ROPE_TYPES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} is unknown; allowed: {', '.join(allowed)}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads} (or set model.head_dim)")
        if self.rope_dim % 2:
            raise ConfigError(f"the rotary dimension {self.rope_dim} (model.head_dim, or model.mla_qk_rope_head_dim) must be even")
        if self.attention == "mla" and self.qk_norm != "none":
            raise ConfigError("model.qk_norm needs model.attention=gqa (multi-head latent attention normalises its latents)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if not self.norm_eps > 0 or not self.rope_theta > 0 or not self.rope_yarn_factor >= 1:
            raise ConfigError("model.norm_eps and model.rope_theta must be > 0, model.rope_yarn_factor >= 1")
        if self.init_from is not None and not self.init_from.startswith("hf:"):
            raise ConfigError(f"model.init_from={self.init_from!r} must be hf:DIR (a Hugging Face checkpoint folder) or null")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Features per head that rotary positions rotate."""
        return self.mla_qk_rope_head_dim if self.attention == "mla" else self.head_size

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 4 * self.d_model

    dense_activation = "swiglu"  # of the dense FFN layers

    def is_moe_layer(self, i: int) -> bool:
        return self.moe.is_moe_layer(i)

    def build(self) -> "LlamaMoE":
        return LlamaMoE(self)

    def check_parallel(self, tp: int, pp: int, expert_tp: bool = False, virtual_stages: int = 1) -> None:
        """Raise ConfigError unless the model can be sharded over tp ranks (each expert too, with expert_tp)
        and cut into pp * virtual_stages stages."""
        kv = {"model.n_kv_heads": self.kv_heads} if self.attention == "gqa" else {}
        check_divisible(self, tp, pp, expert_tp, virtual_stages, **kv)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in at least fp32 and returned in x's dtype times the
    weight. After `shard` the features are split over the TP ranks (weight [dim / tp]): the mean square is summed
    over the ranks."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = init.ones_(nn.Parameter(torch.empty(dim)))
        self.eps = eps
        self.dim = dim  # features over all TP ranks
        self.tp_group: dist.ProcessGroup | None = None

    def shard(self, tp_group: dist.ProcessGroup) -> None:
        """Keep this rank's contiguous block of the features (`tp_shard_dim` 0)."""
        tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        n = self.dim // tp
        self.weight = init.new_parameter(self.weight.detach().narrow(0, rank * n, n).clone(), self.weight)
        self.weight.tp_shard_dim = 0
        self.tp_group = tp_group

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        square = h.square().sum(-1, keepdim=True)
        if self.tp_group is not None:
            square = sum_over_tp(square, self.tp_group)
        return self.weight * (h * torch.rsqrt(square / self.dim + self.eps)).to(x.dtype)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_tables(cfg: LlamaMoEConfig, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [seq_len, rope_dim / 2] of positions 0 .. seq_len - 1 (computed in float64), YaRN-scaled for
    rope_type=yarn (interpolated low frequencies, and cos and sin times its attention factor)."""
    dim = cfg.rope_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    inv_freq = 1.0 / cfg.rope_theta**exponents
    scale = 1.0
    if cfg.rope_type == "yarn":
        factor = cfg.rope_yarn_factor

        def correction_dim(rotations: float) -> float:
            return dim * math.log(cfg.rope_yarn_original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low = max(math.floor(correction_dim(cfg.rope_yarn_beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.rope_yarn_beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        if cfg.rope_yarn_mscale_all_dim:
            scale = _yarn_mscale(factor, cfg.rope_yarn_mscale) / _yarn_mscale(factor, cfg.rope_yarn_mscale_all_dim)
        else:
            scale = _yarn_mscale(factor, 1.0)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotary positions on x [B, heads, S, dim] with cos, sin [S, dim / 2]: feature pairs (i, i + dim/2), or with
    `interleaved` (2i, 2i + 1), turned by position x frequency i."""
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class _Attention(nn.Module):
    """What both attentions share: the causal attention core on this rank's heads, and sharding bookkeeping."""

    def __init__(self, cfg: LlamaMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads  # heads on this rank
        self.dropout = cfg.dropout
        self.recompute = cfg.recompute == "selective"
        self.tp_group: dist.ProcessGroup | None = None
        self.sequence_parallel = False

    def _shard(self, tp_group: dist.ProcessGroup, sequence_parallel: bool, linears: list[nn.Linear]) -> None:
        for linear in linears:
            linear.shard(tp_group, sequence_parallel)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.n_heads //= dist.get_world_size(tp_group)

    def _enter(self, x: Tensor) -> Tensor:
        return enter_tp(x, self.tp_group, self.sequence_parallel)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
        """q, k [B, heads, S, dk] (k and v may have fewer heads: grouped-query), v [B, kv heads, S, dv] ->
        [B, S, heads * dv]."""
        core = lambda q, k, v: self._core(q, k, v, scale)  # noqa: E731
        y = recompute.recomputed(core, q, k, v) if self.recompute and self.training else core(q, k, v)
        b, _, s, dv = y.shape
        return y.transpose(1, 2).reshape(b, s, self.n_heads * dv)

    def _core(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        dropout = self.dropout if self.training else 0.0
        with rank_random(self.tp_group if dropout else None, q.device):  # each rank's own heads
            return nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class GroupedQueryAttention(_Attention):
    """Causal attention with n_kv_heads key/value heads shared by groups of query heads, x [B, S, d] -> [B, S, d]
    (under sequence parallelism [B, S/tp, d] in and out). q_proj [heads * head_dim, d], k_proj and v_proj
    [kv heads * head_dim, d], o_proj [d, heads * head_dim]; a tensor-parallel shard is whole query heads and their
    key/value heads. Optional q_norm, k_norm: RMSNorm per head ([head_dim], the same on every rank) or over all
    heads' features ([heads * head_dim], sharded with the heads)."""

    def __init__(self, cfg: LlamaMoEConfig) -> None:
        super().__init__(cfg)
        hd, d = cfg.head_size, cfg.d_model
        self.n_kv_heads, self.head_dim = cfg.kv_heads, hd
        self.q_proj = ColumnParallelLinear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = ColumnParallelLinear(d, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = ColumnParallelLinear(d, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(cfg.n_heads * hd, d, bias=cfg.o_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(cfg.n_heads * hd if full else hd, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.kv_heads * hd if full else hd, cfg.norm_eps)

    def shard(self, tp_group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        self._shard(tp_group, sequence_parallel, [self.q_proj, self.k_proj, self.v_proj, self.o_proj])
        self.n_kv_heads //= dist.get_world_size(tp_group)
        for norm in (self.q_norm, self.k_norm):
            if norm is None:
                continue
            if self.cfg.qk_norm == "full":
                norm.shard(tp_group)
            else:
                norm.weight.tp_partial = True  # each rank's gradient is its own heads'

    def forward(self, x: Tensor) -> Tensor:
        h = self._enter(x)
        q, k, v = self.q_proj.project(h), self.k_proj.project(h), self.v_proj.project(h)
        if self.cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        b, s, _ = q.shape
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        if self.cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        cos, sin = rope_tables(self.cfg, s, q.device, q.dtype)
        q, k = rotate(q, cos, sin, interleaved=False), rotate(k, cos, sin, interleaved=False)
        return self.o_proj(self.attend(q, k, v))


class MultiHeadLatentAttention(_Attention):
    """DeepSeek-V2's attention, x [B, S, d] -> [B, S, d]. Keys and values come from a shared latent:
    kv_a_proj [kv_lora_rank + rope dim, d] (whole on every TP rank), kv_a_norm, kv_b_proj [heads * (nope dim +
    v dim), kv_lora_rank]; queries from q_proj [heads * (nope + rope dim), d], or through a latent too (q_a_proj,
    q_a_norm, q_b_proj) with mla_q_lora_rank. Each head's query and key are a position-free part and a rotary part
    (interleaved pairs; the key's rotary part is shared by all heads). A tensor-parallel shard is whole heads; the
    latent projections and norms are replicated and their gradients partial."""

    def __init__(self, cfg: LlamaMoEConfig) -> None:
        super().__init__(cfg)
        d, h = cfg.d_model, cfg.n_heads
        self.nope, self.rope, self.v_dim = cfg.mla_qk_nope_head_dim, cfg.mla_qk_rope_head_dim, cfg.mla_v_head_dim
        q_rank, kv_rank = cfg.mla_q_lora_rank, cfg.mla_kv_lora_rank
        self.q_proj = ColumnParallelLinear(d, h * (self.nope + self.rope), bias=False) if q_rank is None else None
        self.q_a_proj = ReplicatedLinear(d, q_rank, bias=cfg.qkv_bias) if q_rank is not None else None
        self.q_a_norm = RMSNorm(q_rank, cfg.norm_eps) if q_rank is not None else None
        self.q_b_proj = ColumnParallelLinear(q_rank, h * (self.nope + self.rope), bias=False) if q_rank is not None else None
        self.kv_a_proj = ReplicatedLinear(d, kv_rank + self.rope, bias=cfg.qkv_bias)
        self.kv_a_norm = RMSNorm(kv_rank, cfg.norm_eps)
        self.kv_b_proj = ColumnParallelLinear(kv_rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = RowParallelLinear(h * self.v_dim, d, bias=cfg.o_bias)
        self.scale = (self.nope + self.rope) ** -0.5
        if cfg.rope_type == "yarn" and cfg.rope_yarn_mscale_all_dim:
            self.scale *= _yarn_mscale(cfg.rope_yarn_factor, cfg.rope_yarn_mscale_all_dim) ** 2

    def shard(self, tp_group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        linears = [m for m in (self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj, self.kv_b_proj, self.o_proj)
                   if m is not None]
        self._shard(tp_group, sequence_parallel, linears)
        for norm in (self.q_a_norm, self.kv_a_norm):
            if norm is not None:
                norm.weight.tp_partial = True

    def forward(self, x: Tensor) -> Tensor:
        h = self._enter(x)
        if self.q_proj is not None:
            q = self.q_proj.project(h)
        else:
            q = self.q_b_proj.project(self.q_a_norm(self.q_a_proj.project(h)))
        b, s, _ = q.shape
        q = q.view(b, s, -1, self.nope + self.rope).transpose(1, 2)
        latent, k_rope = self.kv_a_proj.project(h).split([self.cfg.mla_kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj.project(self.kv_a_norm(latent)).view(b, s, -1, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        cos, sin = rope_tables(self.cfg, s, q.device, q.dtype)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q = torch.cat((q_nope, rotate(q_rope, cos, sin, interleaved=True)), dim=-1)
        k_rope = rotate(k_rope.unsqueeze(1), cos, sin, interleaved=True).expand(-1, k_nope.shape[1], -1, -1)
        return self.o_proj(self.attend(q, torch.cat((k_nope, k_rope), dim=-1), v, self.scale))


def _block(cfg: LlamaMoEConfig, moe: bool) -> Block:
    out_std = default_out_std(cfg.n_layers)
    ffn = MoELayer(cfg.d_model, cfg.hidden, cfg.moe, out_std) if moe else SwiGLUMLP(cfg.d_model, cfg.hidden, out_std)
    attn = MultiHeadLatentAttention(cfg) if cfg.attention == "mla" else GroupedQueryAttention(cfg)
    return Block(RMSNorm(cfg.d_model, cfg.norm_eps), attn, RMSNorm(cfg.d_model, cfg.norm_eps), ffn, cfg.dropout,
                 cfg.recompute == "full")


class LlamaMoE(DecoderLM):
    """forward(idx [B, S] int64) -> (logits [B, S, vocab], summed MoE aux loss []); see DecoderLM.

    Initialisation: N(0, 0.02) for embedding and linear weights, the residual-branch outputs (o_proj, down_proj
    and the experts' w2) scaled by 1 / sqrt(2 n_layers), unit norm gains, zero biases. With `init_from` = hf:DIR
    the weights come from that Hugging Face checkpoint instead (`weights_source`, read by the strategy for each
    rank's share as it materialises the meta-built model; lightning_smartmoe.interop).
    """

    def __init__(self, cfg: LlamaMoEConfig) -> None:
        blocks = {str(i): _block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers)}
        super().__init__(cfg, blocks, RMSNorm(cfg.d_model, cfg.norm_eps), cfg.tie_embeddings)
        self.drop = nn.Dropout(cfg.dropout)
        for module in self.dense_modules(nn.Linear, nn.Embedding):
            init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        for module in self.dense_modules(GroupedQueryAttention, MultiHeadLatentAttention, SwiGLUMLP):
            out = module.o_proj if isinstance(module, _Attention) else module.down_proj
            init.normal_(out.weight, std=default_out_std(cfg.n_layers))
        self.weights_source = None
        if cfg.init_from is not None:
            from lightning_smartmoe.interop.hf_weights import WeightsSource  # interop builds on the models

            self.weights_source = WeightsSource(cfg.init_from.removeprefix("hf:"), self)

    def _shardable(self) -> list[nn.Module]:
        return self.dense_modules(GroupedQueryAttention, MultiHeadLatentAttention, SwiGLUMLP)

    def embed(self, idx: Tensor) -> Tensor:
        """Token ids [B, S] -> hidden [B, S, d] (under sequence parallelism, this rank's [B, S/tp, d])."""
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds model.seq_len={self.cfg.seq_len}")
        x = self.drop(self.tok_emb(idx))
        return scatter_to_sequence(x, self.tp_group) if self.sequence_parallel else x
