"""A tiny GPT-MoE run under any layout, for equivalence and resume tests (runs in a test process or a rank).

Runs are float64 throughout (parameters, AdamW state, activations, gradients and the gloo collectives), so a
layout that computes the same thing as one process differs from it only by summation order, far below RTOL,
whatever the CPU's vector width, BLAS kernels or thread count."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.tensor import DTensor

from lightning_smartmoe import SmartMoEStrategy
from lightning_smartmoe.checkpoint import entries, expert_ids, model_tensors, unsharded
from lightning_smartmoe.data import TokenDataModule
from lightning_smartmoe.models import GPTMoEConfig, LlamaMoEConfig, MoELMModule, OptimConfig
from lightning_smartmoe.moe import MoEConfig

VOCAB = 64
GLOBAL_BATCH = 8

# One bound for every equivalence test, every layout: losses elementwise, gradients and parameters in norm,
# relative. Measured float64 noise floor, the largest error over every layout, switch and resume case of the
# suite: losses 2.1e-16; parameters and gradients 1.0e-14 with AVX-512 kernels, 5.3e-14 with AVX2 kernels forced
# (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2). The bug classes the suite guards
# against (aux-loss weight under a pipeline, a bucket not divided by dp, replica gradients not summed, migrated
# Adam moments left behind) give loss errors of 9e-7 to 4e-4 and parameter or gradient errors of 2e-2 to 7.
# 1e-9 is 2e4 times the floor and 1e3 times below the smallest of those.
RTOL = 1e-9


def write_corpus(path: Path) -> Path:
    np.random.default_rng(0).integers(0, VOCAB, size=8192, dtype=np.uint16).tofile(path)
    return path


def model_config(
    gate: str = "naive", capacity_factor: float | None = None, num_experts: int = 8, n_layers: int = 2, every: int = 1,
    dropout: float = 0.0, recompute: str = "none",
) -> GPTMoEConfig:
    moe = MoEConfig(num_experts=num_experts, top_k=2, gate=gate, capacity_factor=capacity_factor,
                    aux_loss_coeff=0.01, z_loss_coeff=0.001, every=every)
    return GPTMoEConfig(vocab_size=VOCAB, seq_len=16, n_layers=n_layers, d_model=32, n_heads=4, dropout=dropout,
                        recompute=recompute, moe=moe)


def llama_config(capacity_factor: float | None = None, n_layers: int = 2, every: int = 1, recompute: str = "none",
                 hf: bool = False, tie: bool = False) -> LlamaMoEConfig:
    """The Llama-style model at the tiny shape: grouped-query attention (2 key/value heads) with per-head q/k norms,
    SwiGLU experts, a gated shared expert, sigmoid scores with the aux-loss-free expert bias (the aux loss on too,
    so both paths are exercised). `hf`: softmax scores, no bias and no q/k norms instead, a model Hugging Face's
    Qwen2-MoE computes (for export). `tie`: the head reuses the token embedding."""
    moe = MoEConfig(num_experts=8, top_k=2, capacity_factor=capacity_factor, aux_loss_coeff=0.01, z_loss_coeff=0.001,
                    every=every, activation="swiglu", shared_experts=1, shared_expert_hidden=64,
                    shared_expert_gate=True, score="softmax" if hf else "sigmoid", bias_update_rate=0.0 if hf else 0.01)
    return LlamaMoEConfig(vocab_size=VOCAB, seq_len=16, n_layers=n_layers, d_model=32, n_heads=4, n_kv_heads=2,
                          ffn_hidden=64, qk_norm="none" if hf else "head", recompute=recompute, moe=moe,
                          tie_embeddings=tie)


def logical_grads(module: torch.nn.Module, stored=unsharded) -> dict[str, torch.Tensor]:
    """`grad/<param>[:<expert>]` -> the synchronised gradient of each logical tensor, gathered whole from
    tensor-parallel shards and ZeRO blocks (`stored`: the strategy's stored_tensor; collective)."""
    ids = expert_ids(module)
    out = {}
    for name, p in module.named_parameters():
        held, sharding = stored(p)
        if held.grad is not None:
            for key, g in entries(f"grad/{name}", held.grad, held, ids.get(id(p)), sharding):
                out[key] = g.full_tensor() if isinstance(g, DTensor) else g.clone()
    return out


class LossRecorder(pl.Callback):
    """Keeps each training batch's cross-entropy (this rank's), the `train/loss` the module logged for it, and the
    synchronised, unclipped gradients of the first optimizer step (so that a wrong gradient scale, which Adam would
    hide, shows)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.logged: list[float] = []
        self.first_grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["ce"]))
        self.logged.append(float(trainer.callback_metrics["train/loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.first_grads is None:
            self.first_grads = logical_grads(pl_module, trainer.strategy.stored_tensor)


def fit(
    corpus: Path,
    model: GPTMoEConfig | LlamaMoEConfig,
    ep: int = 1,
    tp: int = 1,
    pp: int = 1,
    microbatches: int = 1,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    sequence_parallel: bool = False,
    expert_tp: bool = False,
    steps: int = 5,
    accumulate: int = 1,
    save_dir: Path | None = None,
    resume: Path | None = None,
    clip: float | None = 0.05,
    extra_slots: int = 0,
    callbacks: list[pl.Callback] = (),
    val_windows: int = 0,
    precision: str = "64-true",
    global_batch: int = GLOBAL_BATCH,
    zero: int = 0,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train and return (global per-batch cross-entropies, full logical parameters plus the first step's
    gradients unless resumed), identical on every rank; asserts that the ranks' copies of a tensor are equal and
    that the logged `train/loss` is the global batch's on every rank. With `val_windows`, validate the trained model on
    the first that many validation windows afterwards, and add its loss as "val/loss"."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    pl.seed_everything(0, verbose=False)
    module = MoELMModule(model, OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2))
    dm = TokenDataModule(str(corpus), seq_len=model.seq_len, global_batch_size=global_batch, vocab_size=VOCAB)
    recorder = LossRecorder()
    callbacks = [recorder, *callbacks]
    if save_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=save_dir, save_top_k=-1, every_n_train_steps=2))
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, max_steps=steps, precision=precision,
        strategy=SmartMoEStrategy(tp=tp, pp=pp, ep=ep, microbatches=microbatches, pp_schedule=schedule, virtual_stages=virtual_stages,
                                  sequence_parallel=sequence_parallel, expert_tp=expert_tp, extra_slots=extra_slots, zero=zero),
        accumulate_grad_batches=accumulate, gradient_clip_val=clip,
        limit_val_batches=val_windows // (global_batch // accumulate), num_sanity_val_steps=0, logger=False, enable_checkpointing=save_dir is not None,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, dm, ckpt_path=str(resume) if resume else None)
    val = trainer.validate(module, dm, verbose=False)[0]["val/loss"] if val_windows else None
    losses = torch.tensor(recorder.losses, dtype=torch.float64)
    stored = model_tensors(module, trainer.strategy.stored_tensor)
    params = {k: v.full_tensor() if isinstance(v, DTensor) else v.clone() for k, v in stored.items()}
    if resume is None:
        params.update(recorder.first_grads)
    if val is not None:
        params["val/loss"] = torch.as_tensor(val, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(losses)
        losses /= world
        shards: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(shards, params)
        params = {}
        for rank, shard in enumerate(shards):
            for key, value in shard.items():  # copies held by several ranks (replicas) must be bitwise equal
                assert key not in params or torch.equal(params[key], value), f"{key} differs on rank {rank}"
                params[key] = value
    # the logged loss is the global batch's, on every rank (reduced in the loss's dtype: float32 outside 64-true)
    logged, bound = torch.tensor(recorder.logged, dtype=torch.float64), RTOL if precision == "64-true" else 1e-6
    assert float((logged - losses).abs().max()) <= bound * float(losses.abs().max()), (logged.tolist(), losses.tolist())
    return losses.tolist(), params


def weights(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of a `fit` result without its first-step gradients (a resumed run has none)."""
    return {k: v for k, v in params.items() if not k.startswith("grad/")}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (the absolute norm where want is zero)."""
    diff = (got.double() - want.double()).norm()
    scale = want.double().norm()
    return float(diff / scale if scale > 0 else diff)


def assert_same_run(got, want) -> None:
    """Two `fit` results agree: per-step losses elementwise, each gradient and parameter in norm, within RTOL."""
    (losses, params), (ref_losses, ref_params) = got, want
    assert len(losses) == len(ref_losses), (len(losses), len(ref_losses))
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= RTOL * abs(b), f"loss of step {step}: {a!r} vs {b!r}, relative error {abs(a - b) / abs(b):.2e}"
    assert params.keys() == ref_params.keys()
    for key, ref in ref_params.items():
        err = relative_error(params[key], ref)
        assert err <= RTOL, f"{key}: relative error {err:.2e}"
