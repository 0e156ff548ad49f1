"""The MoE language models as a LightningModule: AdamW, linear warmup + cosine decay, MoE telemetry."""

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.models.decoder import DecoderLM
from lightning_smartmoe.models.gpt_moe import GPTMoEConfig
from lightning_smartmoe.models.llama_moe import LlamaMoEConfig


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
        if not self.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be in [0, 1)")

    def adamw(self, decay: list[Tensor], no_decay: list[Tensor], precision: str) -> torch.optim.AdamW:
        """AdamW with weight decay on `decay` only, for a run at trainer `precision`. Fused (one kernel over all
        tensors, on CPU as on GPUs; bench/step_overhead.py: 4.5M parameters in 45 tensors, 1 thread, 3-5 ms a step
        against 18-32 ms for torch's per-tensor loop; results within one ulp of it), except under mixed precision,
        where Lightning refuses to clip the gradients of an optimizer that unscales them itself: torch then picks
        its default."""
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=(self.beta1, self.beta2), fused=None if "mixed" in precision else True,
        )


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup` steps, cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MoELMModule(pl.LightningModule):
    """Trains the model of `model` (a GPTMoEConfig or LlamaMoEConfig: its `build()`) on (input, target) token batches
    of shape [B, S].

    The model is built in `configure_model` (Lightning calls it; outside a Trainer, call it yourself): under the
    smartmoe strategy on the meta device, so that each rank materialises only its share. Under pipeline
    parallelism the strategy's `pipeline` runs each step's forward and backward; the loss it returns is the
    last stage's, on every rank.

    `train/loss`, `train/ppl`, `val/loss` and `val/ppl` are over the global batch: each rank's cross-entropy (its
    data-parallel share, the same on the tensor-parallel and pipeline ranks of that share) averaged over the world,
    so every layout that trains the same logs the same; perplexity is exp of that loss. `train/loss` is logged every
    step (the progress bar's); `train/ppl` and the MoE statistics only on the steps the loggers write (every
    `log_every_n_steps`), as each `self.log` costs Lightning milliseconds of CPU and the statistics a world
    all-reduce.
    """

    def __init__(self, model: GPTMoEConfig | LlamaMoEConfig, optim: OptimConfig = OptimConfig()) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config, self.optim = model, optim
        self.model: DecoderLM | None = None
        self._val_losses: list[Tensor] = []

    def configure_model(self) -> None:
        if self.model is None:  # Lightning calls this hook for every fit, validate, ...
            self.model = self.model_config.build()

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(idx)

    @property
    def _pipeline(self):
        return getattr(self.trainer.strategy, "pipeline", None)

    def _lm_loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits, aux = self.model(x)
        return self.model.loss(logits, y), aux

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Returns the loss to optimise ("loss": cross-entropy plus MoE aux losses; under pipelining the
        detached cross-entropy, its backward done) and the detached cross-entropy ("ce")."""
        if self._pipeline is not None:
            loss = ce = self._pipeline.train_step(batch, batch_idx, self.trainer.accumulate_grad_batches)
        else:
            ce, aux = self._lm_loss(batch)
            loss = ce + aux
        global_ce = self.trainer.strategy.reduce(ce.detach(), reduce_op="mean")
        self.log("train/loss", global_ce, prog_bar=True)
        if self.trainer._logger_connector.should_update_logs:  # a step the loggers write (log_every_n_steps)
            self.log("train/ppl", global_ce.exp())
            self._log_moe_stats()
        return {"loss": loss, "ce": ce.detach()}

    def on_validation_epoch_start(self) -> None:
        self._val_losses = []

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        ce = self._pipeline.eval_step(batch) if self._pipeline is not None else self._lm_loss(batch)[0]
        self._val_losses.append(ce.detach())

    def on_validation_epoch_end(self) -> None:
        """One reduction for the whole validation: the mean of every rank's batch losses (each rank runs as many
        equal-sized batches)."""
        if not self._val_losses:
            return
        ce = self.trainer.strategy.reduce(torch.stack(self._val_losses).mean(), reduce_op="mean")
        self.log("val/loss", ce, prog_bar=True)
        self.log("val/ppl", ce.exp())

    def _log_moe_stats(self) -> None:
        """Log per-layer expert load (max / mean), dropped fraction, aux and z losses over the global batch.

        One reduction covers every layer of the whole model (a pipeline stage fills the rows of its own).
        """
        num_layers = sum(self.model.cfg.is_moe_layer(i) for i in range(self.model.cfg.n_layers))
        if not num_layers:
            return
        # [E + 5] per layer: expert load, dropped, assignments, aux, z, forwards (counts the contributions)
        stats = torch.zeros(num_layers, self.model.cfg.moe.num_experts + 5, dtype=torch.float64, device=self.device)
        for i, m in enumerate(self.model.moe_layers()):
            st = m.stats
            scalars = [st.dropped.double(), st.aux_loss.double(), st.z_loss.double()]
            extra = torch.tensor([float(st.assignments), float(st.forwards)], dtype=torch.float64, device=self.device)
            stats[i if m.index is None else m.index] = torch.cat([st.expert_load.double(), torch.stack(scalars), extra])
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        load, (dropped, aux, z, assignments, forwards) = stats[:, :-5], stats[:, -5:].unbind(1)
        imbalance = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-12)
        self.log("train/aux_loss", (aux / forwards).mean())
        self.log("train/z_loss", (z / forwards).mean())
        self.log("train/dropped_frac", dropped.sum() / assignments.sum())
        for i, value in enumerate(imbalance):
            self.log(f"moe/layer{i}/load_max_over_mean", value)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        opt = self.optim.adamw(decay, no_decay, str(self.trainer.precision))
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError("trainer.max_steps=-1 (no step limit) needs trainer.max_epochs >= 1: the learning-rate schedule spans the run")
        min_ratio = self.optim.min_lr / self.optim.lr
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, self.optim.warmup_steps, int(total), min_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
