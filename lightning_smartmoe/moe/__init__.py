"""Mixture-of-experts layer in parts: router, dispatcher, experts, layer."""

from lightning_smartmoe.moe.config import MoEConfig
from lightning_smartmoe.moe.dispatcher import TokenDispatcher
from lightning_smartmoe.moe.experts import GroupedExperts
from lightning_smartmoe.moe.layer import MoELayer, MoEStats
from lightning_smartmoe.moe.router import Router, Routing

__all__ = ["GroupedExperts", "MoEConfig", "MoELayer", "MoEStats", "Router", "Routing", "TokenDispatcher"]
