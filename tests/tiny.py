"""A tiny GPT-MoE run under any layout, for equivalence and resume tests (runs in a test process or a rank)."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_smartmoe import SmartMoEStrategy
from lightning_smartmoe.checkpoint import model_tensors
from lightning_smartmoe.data import TokenDataModule
from lightning_smartmoe.models import GPTMoEConfig, GPTMoEModule, OptimConfig
from lightning_smartmoe.moe import MoEConfig

VOCAB = 64
GLOBAL_BATCH = 8


def write_corpus(path: Path) -> Path:
    np.random.default_rng(0).integers(0, VOCAB, size=8192, dtype=np.uint16).tofile(path)
    return path


def model_config(gate: str = "naive", capacity_factor: float | None = None, num_experts: int = 8) -> GPTMoEConfig:
    moe = MoEConfig(num_experts=num_experts, top_k=2, gate=gate, capacity_factor=capacity_factor,
                    aux_loss_coeff=0.01, z_loss_coeff=0.001)
    return GPTMoEConfig(vocab_size=VOCAB, seq_len=16, n_layers=2, d_model=32, n_heads=4, moe=moe)


class LossRecorder(pl.Callback):
    """Keeps each micro-batch's training loss (this rank's)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(
    corpus: Path,
    model: GPTMoEConfig,
    ep: int = 1,
    steps: int = 5,
    accumulate: int = 1,
    save_dir: Path | None = None,
    resume: Path | None = None,
    clip: float | None = 0.05,
    extra_slots: int = 0,
    callbacks: list[pl.Callback] = (),
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train and return (global per-micro-batch losses, full logical parameters), identical on every rank."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    pl.seed_everything(0, verbose=False)
    module = GPTMoEModule(model, OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2))
    dm = TokenDataModule(str(corpus), seq_len=model.seq_len, global_batch_size=GLOBAL_BATCH, vocab_size=VOCAB)
    recorder = LossRecorder()
    callbacks = [recorder, *callbacks]
    if save_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=save_dir, save_top_k=-1, every_n_train_steps=2))
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=SmartMoEStrategy(ep=ep, extra_slots=extra_slots), max_steps=steps,
        accumulate_grad_batches=accumulate, gradient_clip_val=clip,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=save_dir is not None,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, dm, ckpt_path=str(resume) if resume else None)
    losses = torch.tensor(recorder.losses, dtype=torch.float64)
    params = {k: v.clone() for k, v in model_tensors(module).items()}
    if world > 1:
        dist.all_reduce(losses)
        losses /= world
        shards: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(shards, params)
        params = {k: v for shard in shards for k, v in shard.items()}
    return losses.tolist(), params
