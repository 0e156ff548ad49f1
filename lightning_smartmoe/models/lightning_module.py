"""GPT-MoE as a LightningModule: AdamW, linear warmup + cosine decay, MoE telemetry."""

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.models.gpt_moe import GPTMoE, GPTMoEConfig


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr} must be > 0 and optim.min_lr={self.min_lr} in [0, lr]")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup` steps, cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class GPTMoEModule(pl.LightningModule):
    """Trains GPTMoE on (input, target) token batches of shape [B, S]."""

    def __init__(self, model: GPTMoEConfig, optim: OptimConfig = OptimConfig()) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optim = optim
        self.model = GPTMoE(model)

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(idx)

    def _lm_loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits, aux = self.model(x)
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), aux

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ce, aux = self._lm_loss(batch)
        self.log("train/loss", ce, prog_bar=True)
        self.log("train/ppl", ce.detach().exp())
        self._log_moe_stats()
        return ce + aux

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        ce, _ = self._lm_loss(batch)
        self.log("val/loss", ce, prog_bar=True, sync_dist=True)
        self.log("val/ppl", ce.exp(), sync_dist=True)

    def _log_moe_stats(self) -> None:
        """Log per-layer expert load (max / mean), dropped fraction, aux and z losses over the global batch.

        One reduction covers every layer.
        """
        layers = self.model.moe_layers()
        if not layers:
            return
        rows = []
        for m in layers:  # [E + 5] per layer: expert load, dropped, assignments, aux, z, 1 (counts the ranks)
            st = m.stats
            scalars = [st.dropped.double(), st.aux_loss.double(), st.z_loss.double()]
            extra = torch.tensor([float(st.assignments), 1.0], dtype=torch.float64, device=self.device)
            rows.append(torch.cat([st.expert_load.double(), torch.stack(scalars), extra]))
        stats = torch.stack(rows)
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        load, (dropped, aux, z, assignments, ranks) = stats[:, :-5], stats[:, -5:].unbind(1)
        imbalance = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-12)
        self.log("train/aux_loss", (aux / ranks).mean())
        self.log("train/z_loss", (z / ranks).mean())
        self.log("train/dropped_frac", dropped.sum() / assignments.sum())
        for i, value in enumerate(imbalance):
            self.log(f"moe/layer{i}/load_max_over_mean", value)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr,
            betas=(self.optim.beta1, self.optim.beta2),
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        min_ratio = self.optim.min_lr / self.optim.lr
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, self.optim.warmup_steps, int(total), min_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
