"""lightning-smartmoe: SmartMoE-style hybrid-parallel MoE training as a PyTorch Lightning strategy.

Importing the package registers the strategy, so `Trainer(strategy="smartmoe")` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.moe import MoEConfig, MoELayer
from lightning_smartmoe.strategy import SmartMoEStrategy

if SmartMoEStrategy.strategy_name not in StrategyRegistry:
    SmartMoEStrategy.register_strategies(StrategyRegistry)

__all__ = ["ConfigError", "MoEConfig", "MoELayer", "ParallelSizes", "SmartMoEStrategy"]
