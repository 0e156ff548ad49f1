"""The gate-histogram callback: one reduction per optimizer step, telemetry, heatmaps, and switching decisions."""

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tiny
from lightning_smartmoe import ConfigError, SmartMoEStrategy, plots
from lightning_smartmoe import callbacks as callbacks_module
from lightning_smartmoe.callbacks import ExpertPlacementCallback
from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.data import TokenDataModule
from lightning_smartmoe.models import MoELMModule, OptimConfig
from lightning_smartmoe.moe import MoEConfig, MoELayer
from lightning_smartmoe.placement import Placement


class CountingStrategy(SmartMoEStrategy):
    """Counts the callback's reductions: the only sum-reductions of int64 [layers, E + 1] tensors."""

    calls = 0

    def reduce(self, tensor, group=None, reduce_op="mean"):
        if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int64 and tensor.dim() == 2:
            CountingStrategy.calls += 1
        return super().reduce(tensor, group, reduce_op)


def test_one_reduction_per_step_window_heatmaps(tmp_path):
    corpus = tiny.write_corpus(tmp_path / "tokens.bin")
    model = tiny.model_config()
    callback = ExpertPlacementCallback(policy="greedy", interval=3, window=2, heatmap_every=2)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=CountingStrategy(), max_steps=6, accumulate_grad_batches=2,
        logger=TensorBoardLogger(tmp_path, name="tb"), log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[callback],
    )
    CountingStrategy.calls = 0
    trainer.fit(MoELMModule(model, OptimConfig(lr=1e-3)), TokenDataModule(str(corpus), seq_len=16, global_batch_size=8, vocab_size=tiny.VOCAB))
    assert CountingStrategy.calls == 6  # one per optimizer step (12 micro-batches), all layers at once
    assert len(callback.history) == 2 and callback.history[-1].shape == (2, 8)
    # each step's counts are the two micro-batches' assignments: 8 sequences x 16 tokens x top-2 per layer
    assert callback.history[-1].sum(1).tolist() == [8 * 16 * 2] * 2
    log_dir = Path(trainer.logger.log_dir)
    rows = list(csv.reader(open(log_dir / "expert_load.csv")))
    assert rows[0][:3] == ["step", "layer", "expert0"] and [r[0] for r in rows[1:]] == ["2", "2", "4", "4", "6", "6"]
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert events.Tags()["images"] == ["moe/expert_load"]
    width, height = plots.heatmap_size_px(2)
    assert [(e.width, e.height) for e in events.Images("moe/expert_load")] == [(width, height)] * 3
    pngs = sorted((log_dir / "expert_load").glob("*.png"))
    assert [p.name for p in pngs] == ["step_000002.png", "step_000004.png", "step_000006.png"]
    pixels = np.asarray(Image.open(pngs[-1]).convert("RGB"))
    assert pixels.shape == (height, width, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a coloured map with labels, not a flat image
    for tag in ("moe/layer0/rank_imbalance", "moe/layer1/dropped", "placement/switches"):
        assert tag in events.Tags()["scalars"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(policy="random"), r"placement\.policy='random' is unknown; allowed: static, greedy, balanced"),
        (dict(interval=0), r"placement\.interval=0 must be an integer >= 1 or 'epoch'"),
        (dict(window=0), r"placement\.window=0 must be an integer >= 1"),
        (dict(hardware="h900"), r"hardware='h900': no such file; give a built-in name"),
    ],
)
def test_bad_placement_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ExpertPlacementCallback(**kwargs)


class _Module(torch.nn.Module):
    def __init__(self, layers: list) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def log(self, *args, **kwargs) -> None:
        pass


@pytest.mark.parametrize("overlapped,expected", [(True, [0, 1, 2]), (False, [0, 0, 0])])
def test_replica_exchange_is_charged_net_of_later_backward_when_overlapped(monkeypatch, overlapped, expected):
    """Layer i's exchange hides under the backward of the i MoE layers before it, if the strategy overlaps."""
    seen = []

    def record(policy, load, current, cost):
        seen.append((cost.hidden_phases, cost.grad_bytes))
        return current

    monkeypatch.setattr(callbacks_module, "plan", record)
    layers = [MoELayer(8, 16, MoEConfig(num_experts=4, top_k=1)) for _ in range(3)]
    for i, layer in enumerate(layers):
        layer.index = i
        layer.relabel(Placement.contiguous(4, 1))
    callback = ExpertPlacementCallback(policy="balanced", interval=1)
    callback.history = [torch.ones(3, 4)]
    strategy = SimpleNamespace(replica_sync_overlapped=overlapped, sizes=ParallelSizes(dp=1, ep=1))
    trainer = SimpleNamespace(strategy=strategy, lightning_module=_Module(layers), accumulate_grad_batches=1,
                              precision="32-true")
    callback.replan(trainer, steps=1)
    assert seen == [(h, 2 * 8 * 16 * 4) for h in expected]  # fp32 gradients of the 8 x 16 experts
