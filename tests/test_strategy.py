"""Trainer(strategy="smartmoe") with a LightningModule written as a user would, on one and two processes."""

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distributed import run_distributed
from tiny import RTOL, relative_error
from lightning_smartmoe import ConfigError, MoEConfig, MoELayer, SmartMoEStrategy
from lightning_smartmoe.checkpoint import model_tensors


class UserModel(pl.LightningModule):
    """Regression through an MoE layer: x [B, S, 4] -> y [B, S, 1]."""

    def __init__(self, num_experts: int = 4, aux_loss_coeff: float = 0.01) -> None:
        super().__init__()
        self.num_experts, self.aux_loss_coeff = num_experts, aux_loss_coeff
        self.build_layers()

    def build_layers(self) -> None:
        self.embed = nn.Linear(4, 16)
        self.moe = MoELayer(16, 32, MoEConfig(num_experts=self.num_experts, top_k=2, aux_loss_coeff=self.aux_loss_coeff))
        self.head = nn.Linear(16, 1)

    def loss(self, batch):
        x, y = batch
        h, aux = self.moe(self.embed(x))
        return nn.functional.mse_loss(self.head(h), y) + aux

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def user_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, 4, generator=g)
    return TensorDataset(x, x.sum(-1, keepdim=True).sin())


def initial_loss() -> float:
    pl.seed_everything(0, verbose=False)
    model = UserModel()
    x, y = user_data().tensors
    return float(model.loss((x, y)))


def user_trainer(**kwargs) -> pl.Trainer:
    kwargs.setdefault("max_steps", 40)
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


@pytest.mark.timeout(120)
def test_user_module_trains_with_strategy_by_name():
    start = initial_loss()
    pl.seed_everything(0, verbose=False)
    trainer = user_trainer(strategy="smartmoe", devices=1)
    assert isinstance(trainer.strategy, SmartMoEStrategy)
    trainer.fit(UserModel(), DataLoader(user_data(), batch_size=16))
    assert float(trainer.callback_metrics["loss"]) < 0.5 * start


@pytest.mark.timeout(180)
def test_user_module_spawns_two_expert_parallel_ranks_from_pytest_in_bf16_mixed():
    start = initial_loss()
    pl.seed_everything(0, verbose=False)
    model = UserModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = user_trainer(strategy=SmartMoEStrategy(ep=2), devices=2, precision="bf16-mixed")
    trainer.fit(model, DataLoader(user_data(), batch_size=8))
    assert float(trainer.callback_metrics["loss"]) < 0.5 * start
    # the parent's model is left as it was (rank 0 holds half the experts), not overwritten with a shard
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sizes_that_do_not_divide_fail_before_spawn():
    with pytest.raises(ConfigError, match=r"parallel\.ep=3 must divide parallel\.dp x parallel\.tp = 2 x 1 = 2"):
        user_trainer(strategy=SmartMoEStrategy(ep=3), devices=2).fit(UserModel(), DataLoader(user_data()))
    with pytest.raises(ConfigError, match=r"moe\.num_experts=4 must be divisible by parallel\.ep=8"):
        user_trainer(strategy=SmartMoEStrategy(ep=8), devices=8).fit(UserModel(), DataLoader(user_data()))
    with pytest.raises(ConfigError, match=r"world size 2 .* must equal"):
        user_trainer(strategy=SmartMoEStrategy(dp=4, ep=2), devices=2).fit(UserModel(), DataLoader(user_data()))
    with pytest.raises(ConfigError, match=r"parallel\.tp > 1 or parallel\.pp > 1 need a model with check_parallel"):
        user_trainer(strategy=SmartMoEStrategy(tp=2), devices=2).fit(UserModel(), DataLoader(user_data()))
    with pytest.raises(ConfigError, match=r"parallel\.pp_schedule='zb' is unknown"):
        SmartMoEStrategy(pp=2, pp_schedule="zb")


class ManualModel(UserModel):
    """Manual optimization with two backwards per SGD step, and a parameter that only some ranks use in some
    backwards (per-sample math, so any batching gives the same gradient)."""

    def __init__(self) -> None:
        super().__init__(aux_loss_coeff=0.0)
        self.automatic_optimization = False
        self.extra = nn.Linear(16, 16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        half = len(x) // 2
        for part in (slice(0, half), slice(half, None)):
            h, _ = self.moe(self.embed(x[part]))
            mask = (x[part, :1, :1] > 0.5).float()
            if mask.any():
                h = h + 0.1 * self.extra(h) * mask
            self.manual_backward(nn.functional.mse_loss(self.head(h), y[part]) / 2)
        opt = self.optimizers()
        opt.step()
        opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_manual(world: int) -> dict[str, torch.Tensor]:
    """Three float64 steps of ManualModel on a global batch of 16; returns the trained non-expert parameters."""
    pl.seed_everything(0, verbose=False)
    model = ManualModel()
    sampler = torch.utils.data.DistributedSampler(user_data(), num_replicas=world, rank=dist.get_rank() if world > 1 else 0, shuffle=False)
    trainer = user_trainer(strategy=SmartMoEStrategy(ep=world, bucket_mb=1e-5), devices=world, max_steps=3,
                           use_distributed_sampler=False, precision="64-true")
    trainer.fit(model, DataLoader(user_data(), batch_size=16 // world, sampler=sampler))
    return {k: v for k, v in model.state_dict().items() if "experts" not in k}


class ConfiguredModel(UserModel):
    """UserModel building its layers in configure_model, Lightning's convention for large models."""

    def build_layers(self) -> None:
        self.embed = self.moe = self.head = None

    def configure_model(self) -> None:
        if self.moe is None:
            super().build_layers()


def fit_built(world: int, how: str) -> dict[str, torch.Tensor]:
    """Three float64 steps of a user model built on the meta device (`how`: in configure_model, or in __init__
    under Trainer.init_module()); returns every logical tensor, gathered from the ranks."""
    pl.seed_everything(0, verbose=False)
    sampler = torch.utils.data.DistributedSampler(user_data(), num_replicas=world, rank=dist.get_rank() if world > 1 else 0, shuffle=False)
    trainer = user_trainer(strategy=SmartMoEStrategy(ep=world), devices=world, max_steps=3, use_distributed_sampler=False,
                           precision="64-true")
    if how == "configure_model":
        model = ConfiguredModel()
    else:
        with trainer.init_module():
            model = UserModel()
        assert all(p.is_meta for p in model.parameters())
    trainer.fit(model, DataLoader(user_data(), batch_size=16 // world, sampler=sampler))
    tensors = {k: v.clone() for k, v in model_tensors(model, trainer.strategy.stored_tensor).items()}
    if world == 1:
        return tensors
    parts = [None] * world
    dist.all_gather_object(parts, tensors)
    return {k: v for part in parts for k, v in part.items()}


def _collectives():
    strategy = SmartMoEStrategy(ep=2)
    rank = dist.get_rank()
    t = torch.tensor([float(rank + 1)])
    return {
        "sum": strategy.reduce(t.clone(), reduce_op="sum").item(),
        "mean": strategy.reduce(t.clone(), reduce_op="mean").item(),
        "broadcast": strategy.broadcast({"from": rank}, src=1),
        "gathered": strategy.all_gather(t).flatten().tolist(),
        "barrier": strategy.barrier() is None,
        "manual": fit_manual(2),
        "configure_model": fit_built(2, "configure_model"),
        "init_module": fit_built(2, "init_module"),
    }


@pytest.mark.timeout(150)
def test_collectives_and_manual_optimization_on_two_ranks():
    """reduce/broadcast/all_gather/barrier; then several backwards per step with a parameter unused on some
    ranks and one bucket per parameter (bucket all-reduces interleave with the dispatch all-to-alls)
    matches one process; and so do user models built on the meta device."""
    single = fit_manual(1)
    built = {how: fit_built(1, how) for how in ("configure_model", "init_module")}
    for out in run_distributed(2, _collectives, timeout=130):
        for how, want in built.items():  # meta-device construction: each rank initialises its share alike
            got = out.pop(how)
            assert got.keys() == want.keys()
            assert all(relative_error(got[k], v) <= RTOL for k, v in want.items()), how
        manual = out.pop("manual")
        assert out == {"sum": 3.0, "mean": 1.5, "broadcast": {"from": 1}, "gathered": [1.0, 2.0], "barrier": True}
        for key, want in single.items():
            assert relative_error(manual[key], want) <= RTOL, key


def _reductions() -> list:
    """This rank's results of the strategy's reduce: mean (float and int), sum, max, a ReduceOp, a non-tensor."""
    r, strategy = dist.get_rank(), SmartMoEStrategy()
    got = [strategy.reduce(torch.tensor(float(r + 1))), strategy.reduce(torch.tensor(r + 2), reduce_op="avg"),
           strategy.reduce(torch.tensor([r, 10.0]), reduce_op="sum"), strategy.reduce(torch.tensor(r), reduce_op="max"),
           strategy.reduce(torch.tensor(1), reduce_op=dist.ReduceOp.SUM)]
    return [t.tolist() for t in got] + [strategy.reduce("not a tensor")]


@pytest.mark.timeout(60)
def test_reduce_is_one_all_reduce_with_lightnings_meanings():
    """Mean is the sum over the world divided by its size (in place, truncated for integers, as Lightning's)."""
    for got in run_distributed(2, _reductions, timeout=50):
        assert got == [1.5, 2, [1.0, 20.0], 1, 2, "not a tensor"]
