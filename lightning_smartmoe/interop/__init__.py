"""Hugging Face checkpoints: import (`from_hf`, `model.init_from=hf:DIR`) and export (`smartmoe-export`)."""

import dataclasses
from pathlib import Path

from lightning_smartmoe import init
from lightning_smartmoe.interop import hf_config
from lightning_smartmoe.models.llama_moe import LlamaMoE, LlamaMoEConfig


def hf_model_config(directory: str | Path, base: LlamaMoEConfig | None = None) -> LlamaMoEConfig:
    """The LlamaMoEConfig of Hugging Face checkpoint folder `directory` (its config.json), starting from `base`'s
    training settings (default: LlamaMoEConfig() with seq_len = the checkpoint's max_position_embeddings)."""
    hf = hf_config.read(directory)
    base = base or LlamaMoEConfig(seq_len=hf.get("max_position_embeddings", 128))
    cfg = hf_config.to_llama(hf, base, str(Path(directory) / "config.json"))
    return dataclasses.replace(cfg, init_from=f"hf:{directory}")


def from_hf(directory: str | Path, base: LlamaMoEConfig | None = None) -> LlamaMoE:
    """The LlamaMoE of a Hugging Face checkpoint folder (safetensors + config.json: Mixtral, Qwen2-MoE, Qwen3-MoE,
    OLMoE or DeepSeek-V2 style). Built on the meta device (inside a LightningModule's `configure_model` under the
    smartmoe strategy), its weights are read by the strategy for each rank's share only; built anywhere else, they
    are read here, whole."""
    model = LlamaMoE(hf_model_config(directory, base))
    if not init.has_meta_tensors(model):
        model.weights_source.load(model)
        model.weights_source = None
    return model


__all__ = ["from_hf", "hf_model_config"]
