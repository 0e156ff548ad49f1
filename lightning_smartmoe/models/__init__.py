"""GPT-MoE language model and its LightningModule."""

from lightning_smartmoe.models.gpt_moe import GPTMoE, GPTMoEConfig
from lightning_smartmoe.models.lightning_module import GPTMoEModule, OptimConfig

__all__ = ["GPTMoE", "GPTMoEConfig", "GPTMoEModule", "OptimConfig"]
