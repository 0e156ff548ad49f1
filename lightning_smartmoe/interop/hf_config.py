"""Hugging Face config.json <-> LlamaMoEConfig, for the MoE architectures we read and write: Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE and DeepSeek-V2. A field we cannot reproduce (another activation, sliding windows, dense layers
where our `moe.every` cannot put them, ...) is refused with a ConfigError naming it."""

import dataclasses
import json
from pathlib import Path
from typing import Any

from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.models.llama_moe import LlamaMoEConfig
from lightning_smartmoe.moe import MoEConfig

ARCHITECTURES = {  # model_type -> the architectures entry transformers loads it by
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
}
# the MoE fields an import takes from the checkpoint; the others (aux losses, capacity, expert bias) stay ours
MOE_SHAPE = ("num_experts", "top_k", "activation", "expert_hidden", "every", "first_dense", "shared_experts",
             "shared_expert_hidden", "shared_expert_gate", "score", "renormalize", "scaling_factor")


def read(directory: str | Path) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint folder; ConfigError if there is none or its model type is not one
    of ARCHITECTURES."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.init_from=hf:{directory}: no config.json there (a Hugging Face checkpoint folder)")
    hf = json.loads(path.read_text())
    if hf.get("model_type") not in ARCHITECTURES:
        raise ConfigError(f"{path}: model_type={hf.get('model_type')!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return hf


def _refuse(path: str, field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path}: {field}={value!r} is not supported (we can map {allowed})")


def _rope(hf: dict[str, Any], path: str) -> dict[str, Any]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(rope["rope_theta"])}
    if kind == "yarn":
        out.update(rope_type="yarn", rope_yarn_factor=float(rope["factor"]),
                   rope_yarn_original_seq_len=int(rope["original_max_position_embeddings"]),
                   rope_yarn_beta_fast=float(rope.get("beta_fast", 32.0)), rope_yarn_beta_slow=float(rope.get("beta_slow", 1.0)),
                   rope_yarn_mscale=float(rope.get("mscale", 1.0)), rope_yarn_mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)))
    elif kind != "default":
        _refuse(path, "rope_parameters.rope_type", kind, "default or yarn")
    return out


def _moe_fields(hf: dict[str, Any], path: str) -> dict[str, Any]:
    kind = hf["model_type"]
    moe: dict[str, Any] = {"activation": "swiglu", "top_k": hf["num_experts_per_tok"], "score": "softmax"}
    if kind == "mixtral":
        moe.update(num_experts=hf["num_local_experts"], expert_hidden=hf["intermediate_size"], renormalize=True)
    elif kind == "deepseek_v2":
        if hf.get("topk_method", "greedy") != "greedy":
            _refuse(path, "topk_method", hf["topk_method"], "greedy")
        if hf.get("scoring_func", "softmax") != "softmax":
            _refuse(path, "scoring_func", hf["scoring_func"], "softmax")
        shared = hf.get("n_shared_experts") or 0
        moe.update(num_experts=hf["n_routed_experts"], expert_hidden=hf["moe_intermediate_size"],
                   renormalize=False,  # transformers' DeepSeek-V2 router does not renormalise the top-k weights
                   scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), first_dense=hf.get("first_k_dense_replace", 0),
                   every=hf.get("moe_layer_freq", 1), shared_experts=shared,
                   shared_expert_hidden=hf["moe_intermediate_size"] * shared if shared else None)
    else:
        expert_hidden = hf["intermediate_size"] if kind == "olmoe" else hf["moe_intermediate_size"]
        moe.update(num_experts=hf.get("num_experts", hf.get("num_local_experts")), expert_hidden=expert_hidden,
                   renormalize=bool(hf.get("norm_topk_prob", False)), every=hf.get("decoder_sparse_step", 1))
        if hf.get("mlp_only_layers"):
            _refuse(path, "mlp_only_layers", hf["mlp_only_layers"], "[]: dense layers only by decoder_sparse_step")
        if kind == "qwen2_moe" and hf.get("shared_expert_intermediate_size"):
            moe.update(shared_experts=1, shared_expert_hidden=hf["shared_expert_intermediate_size"], shared_expert_gate=True)
    return moe


def to_llama(hf: dict[str, Any], base: LlamaMoEConfig, path: str = "config.json") -> LlamaMoEConfig:
    """`base` with the architecture of Hugging Face config `hf` (shapes, norms, positions, routing); its training
    settings (seq_len, dropout, recomputation, the MoE aux losses, capacity and expert bias) are kept."""
    kind = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(path, "hidden_act", hf["hidden_act"], "silu (SwiGLU)")
    if hf.get("use_sliding_window") or (kind == "mixtral" and hf.get("sliding_window")):
        _refuse(path, "sliding_window", hf.get("sliding_window"), "null (full causal attention)")
    if hf.get("clip_qkv") is not None:
        _refuse(path, "clip_qkv", hf["clip_qkv"], "null")
    bias = bool(hf.get("qkv_bias", True) if kind == "qwen2_moe" else hf.get("attention_bias", False))
    model: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"), ffn_hidden=hf["intermediate_size"],
        norm_eps=float(hf["rms_norm_eps"]), tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=bias,
        o_bias=bias and kind != "qwen2_moe", qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(kind, "none"),
        **_rope(hf, path),
    )
    if kind == "deepseek_v2":
        model.update(attention="mla", n_kv_heads=None, mla_q_lora_rank=hf.get("q_lora_rank"),
                     mla_kv_lora_rank=hf["kv_lora_rank"], mla_qk_nope_head_dim=hf["qk_nope_head_dim"],
                     mla_qk_rope_head_dim=hf["qk_rope_head_dim"], mla_v_head_dim=hf["v_head_dim"])
    elif hf.get("head_dim"):
        model["head_dim"] = hf["head_dim"]
    defaults = {f: getattr(MoEConfig(), f) for f in MOE_SHAPE}  # fields the architecture does not set are reset
    moe = dataclasses.replace(base.moe, **{**defaults, **_moe_fields(hf, path)})
    if moe.gate != "naive":
        raise ConfigError(f"moe.gate={moe.gate!r}: a Hugging Face {kind} model routes with the naive gate (moe.gate=naive)")
    return dataclasses.replace(base, **model, moe=moe)


def _gqa_architecture(cfg: LlamaMoEConfig) -> str:
    """The model type of a grouped-query-attention model: by its q/k norms, then by its shared experts."""
    m = cfg.moe
    kind = {"head": "qwen3_moe", "full": "olmoe"}.get(cfg.qk_norm, "qwen2_moe" if m.shared_experts else "mixtral")
    needs = {
        "qwen2_moe": m.shared_expert_gate and not cfg.o_bias,
        "qwen3_moe": not m.shared_experts and cfg.o_bias == cfg.qkv_bias,
        "olmoe": not m.shared_experts and m.every == 1 and cfg.o_bias == cfg.qkv_bias,
        "mixtral": m.renormalize and m.every == 1 and not cfg.qkv_bias and not cfg.o_bias,
    }
    if not needs[kind]:
        rules = {"qwen2_moe": "moe.shared_expert_gate=true, model.o_bias=false",
                 "qwen3_moe": "no shared experts, model.o_bias = model.qkv_bias",
                 "olmoe": "no shared experts, moe.every=1, model.o_bias = model.qkv_bias",
                 "mixtral": "moe.renormalize=true, moe.every=1, no attention biases"}
        raise ConfigError(f"export: model.qk_norm={cfg.qk_norm} with moe.shared_experts={m.shared_experts} is {kind}, "
                          f"which needs {rules[kind]}")
    return kind


def to_hf(cfg: LlamaMoEConfig) -> dict[str, Any]:
    """The config.json of the Hugging Face architecture that computes what `cfg` does; ConfigError if none does."""
    m = cfg.moe
    if (m.activation != "swiglu" or m.gate != "naive" or m.score != "softmax" or m.groups > 1 or m.bias_update_rate
            or cfg.rope_type != "default"):
        raise ConfigError("export needs moe.activation=swiglu, moe.gate=naive, moe.score=softmax, moe.groups=1, "
                          "moe.bias_update_rate=0 and model.rope_type=default (what the exported architectures compute)")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps,
                  rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"}, hidden_act="silu",
                  tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.seq_len,
                  num_experts_per_tok=m.top_k, intermediate_size=cfg.hidden)
    hidden = m.expert_hidden or cfg.hidden
    if cfg.attention == "mla":
        shared = m.shared_experts
        if m.renormalize or m.shared_expert_gate or (shared and m.shared_hidden(hidden) != shared * hidden):
            raise ConfigError("export as deepseek_v2 needs moe.renormalize=false, no moe.shared_expert_gate and "
                              "moe.shared_expert_hidden = moe.shared_experts x the expert hidden size")
        kind = "deepseek_v2"
        extra = dict(n_routed_experts=m.num_experts, moe_intermediate_size=hidden, n_shared_experts=shared,
                     first_k_dense_replace=m.first_dense, moe_layer_freq=m.every, routed_scaling_factor=m.scaling_factor,
                     topk_method="greedy", q_lora_rank=cfg.mla_q_lora_rank, kv_lora_rank=cfg.mla_kv_lora_rank,
                     qk_nope_head_dim=cfg.mla_qk_nope_head_dim, qk_rope_head_dim=cfg.mla_qk_rope_head_dim,
                     v_head_dim=cfg.mla_v_head_dim, attention_bias=cfg.qkv_bias, num_key_value_heads=cfg.n_heads)
        if cfg.qkv_bias != cfg.o_bias:
            raise ConfigError("export as deepseek_v2 needs model.qkv_bias = model.o_bias")
    else:
        if m.first_dense or m.scaling_factor != 1.0:
            raise ConfigError("export of a grouped-query-attention model needs moe.first_dense=0 and moe.scaling_factor=1")
        kind = _gqa_architecture(cfg)
        extra = dict(head_dim=cfg.head_size, norm_topk_prob=m.renormalize, decoder_sparse_step=m.every,
                     mlp_only_layers=[], attention_bias=cfg.qkv_bias)
        if kind == "mixtral":
            extra = dict(head_dim=cfg.head_size, num_local_experts=m.num_experts, intermediate_size=hidden,
                         sliding_window=None)
        elif kind == "olmoe":
            extra.update(num_experts=m.num_experts, intermediate_size=hidden)
        else:
            extra.update(num_experts=m.num_experts, moe_intermediate_size=hidden, qkv_bias=cfg.qkv_bias)
            if kind == "qwen2_moe":
                extra["shared_expert_intermediate_size"] = m.shared_hidden(hidden) if m.shared_experts else 0
    return {"architectures": [ARCHITECTURES[kind]], "model_type": kind, **common, **extra}
