"""The decoder-only MoE language models (GPT-MoE, Llama-style MoE) and their LightningModule."""

from lightning_smartmoe.models.gpt_moe import GPTMoE, GPTMoEConfig
from lightning_smartmoe.models.lightning_module import MoELMModule, OptimConfig
from lightning_smartmoe.models.llama_moe import LlamaMoE, LlamaMoEConfig

ModelConfig = GPTMoEConfig | LlamaMoEConfig
MODELS = {"gpt_moe": GPTMoEConfig, "llama_moe": LlamaMoEConfig}  # model.arch -> its config

__all__ = ["GPTMoE", "GPTMoEConfig", "LlamaMoE", "LlamaMoEConfig", "MODELS", "ModelConfig", "MoELMModule", "OptimConfig"]
