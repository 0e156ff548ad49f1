"""Training callbacks."""

import time
from typing import Any

import lightning.pytorch as pl


class TokensPerSecond(pl.Callback):
    """Logs `train/tokens_per_s`: tokens of the global micro-batch (this rank's batch [B, S] times the
    data-parallel size) per wall second between consecutive training batches. Shown in the progress bar."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            kwargs = trainer.strategy.distributed_sampler_kwargs or {}
            tokens = batch[0].numel() * kwargs.get("num_replicas", 1)
            pl_module.log("train/tokens_per_s", tokens / (now - self._last), prog_bar=True)
        self._last = now
