"""Faults to inject into real runs through the CLI's `callbacks` group (`+callbacks.NAME._target_=faults.X`, with
tests/ on PYTHONPATH)."""

import lightning.pytorch as pl


class RaiseOnRank(pl.Callback):
    """Raises RuntimeError on global rank `rank` when optimizer step `step` has finished."""

    def __init__(self, rank: int = 1, step: int = 3) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"fault injected on rank {self.rank} after step {self.step}")
