"""Switching expert placement (permutations and replicas) mid-training changes nothing but summation order,
moves exactly the experts that change, and carries their optimizer state along."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import tiny
from distributed import run_distributed
from tiny import assert_same_run
from lightning_smartmoe.checkpoint import optimizer_tensors
from lightning_smartmoe.moe import MoELayer
from lightning_smartmoe.placement import EMPTY, Placement

STEPS = 7
SWITCH_AT = (1, 2, 4, 5)  # after these optimizer steps: gaps of 1 to 3 steps


def random_placement(num_experts: int, ep: int, extra: int, gen: torch.Generator) -> Placement:
    """A random permutation of the experts plus, in each rank's extra slots, replicas of random experts the rank
    does not hold yet (or nothing)."""
    local = num_experts // ep
    perm = torch.randperm(num_experts, generator=gen).tolist()
    rows = [perm[r * local : (r + 1) * local] for r in range(ep)]
    for row in rows:
        others = [e for e in range(num_experts) if e not in row]
        picks = torch.randperm(len(others), generator=gen)[:extra].tolist()
        row += [others[i] for i in picks if torch.rand(1, generator=gen).item() < 0.8]
        row[:] = [row[i] for i in torch.randperm(len(row), generator=gen).tolist()]
    return Placement.from_rank_experts(rows, num_experts, local + extra)


def remote_copies(old: Placement, new: Placement) -> int:
    """Slots that receive an expert their rank did not hold before (each needs one copy over the network)."""
    spr = old.slots_per_rank
    return sum(
        1
        for slot, (was, e) in enumerate(zip(old.slot_expert, new.slot_expert))
        if e != was and e != EMPTY and e not in old.slot_expert[slot // spr * spr : (slot // spr + 1) * spr]
    )


def _gather_logical(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    shards = [None] * dist.get_world_size()
    whole = {k: v.full_tensor() if isinstance(v, DTensor) else v.clone() for k, v in tensors.items()}  # ZeRO blocks
    dist.all_gather_object(shards, whole)
    return {k: v for shard in shards for k, v in shard.items()}


class RandomSwitches(pl.Callback):
    """Moves every MoE layer to a random placement after the steps in SWITCH_AT, checking each migration."""

    def __init__(self, extra: int) -> None:
        self.extra = extra
        self.gen = torch.Generator().manual_seed(1)  # same on every rank
        self.replicated = 0
        self.done = set()
        self.overlapped = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.overlapped = trainer.strategy.replica_sync_overlapped

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in SWITCH_AT or step in self.done:
            return
        self.done.add(step)
        optimizer = trainer.optimizers[0]
        stored = trainer.strategy.stored_tensor
        before = _gather_logical(optimizer_tensors(pl_module, optimizer, 0, stored))
        for layer in (m for m in pl_module.modules() if isinstance(m, MoELayer)):
            old = layer.placement
            new = random_placement(old.num_experts, old.ep, self.extra, self.gen)
            self.replicated += int((new.num_replicas > 1).sum())
            sent = torch.tensor(trainer.strategy.migrate(layer, new))
            dist.all_reduce(sent, group=layer.ep_group)  # this expert-parallel group's traffic
            width = sum(f[0].numel() for f in trainer.strategy.slot_fields(layer))  # weights, exp_avg, exp_avg_sq
            assert int(sent) == remote_copies(old, new) * width
            assert layer.placement == new
        after = _gather_logical(optimizer_tensors(pl_module, optimizer, 0, stored))
        assert before.keys() == after.keys()
        for key, value in before.items():  # every expert's Adam state is where the expert went, unchanged
            assert torch.equal(value, after[key]), key


def _switching_vs_static(corpus: str, ep: int, extra: int, accumulate: int):
    model = tiny.model_config(num_experts=8)
    static = tiny.fit(Path(corpus), model, ep=ep, steps=STEPS, extra_slots=extra, accumulate=accumulate)
    switches = RandomSwitches(extra)
    switching = tiny.fit(Path(corpus), model, ep=ep, steps=STEPS, extra_slots=extra, accumulate=accumulate,
                         callbacks=[switches])
    return static, switching, switches.replicated, switches.overlapped


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,ep,extra,accumulate", [(2, 2, 1, 1), (2, 2, 1, 2), (4, 2, 1, 1), (4, 4, 2, 1)])
def test_switching_placements_keeps_the_numerics(corpus, world, ep, extra, accumulate):
    """ep = dp sums replica gradients during backward (with accumulation: in the last micro-batch's); ep < dp
    after the expert-data-parallel average."""
    static, switching, replicated, overlapped = run_distributed(
        world, _switching_vs_static, str(corpus), ep, extra, accumulate, timeout=220
    )[0]
    assert replicated > 0, "the schedule should include replicated experts"
    assert overlapped == (ep == world)
    assert_same_run(switching, static)


class CrashInMigration(pl.Callback):
    """From step `at` on, rank 1 dies inside the migration's expert exchange (its peers are left waiting).
    Runs before RandomSwitches, which then migrates."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at and dist.get_rank() == 1:

            def die(*args, **kwargs):
                raise RuntimeError("rank 1 died during migration")

            dist.all_to_all_single = die


def _save_switching_then_resume(corpus: str, save: str):
    """Train 6 steps switching placements, checkpointing every 2 steps; then resume from step 4 under the saved
    placement and under another policy (greedy, switching every step)."""
    from lightning_smartmoe.callbacks import ExpertPlacementCallback

    model = tiny.model_config(num_experts=8)
    full = tiny.fit(Path(corpus), model, ep=2, steps=6, extra_slots=1, save_dir=Path(save), callbacks=[RandomSwitches(1)])
    ckpt = Path(save) / "epoch=0-step=4.ckpt"
    saved_placement = tiny.fit(Path(corpus), model, ep=2, steps=6, extra_slots=1, resume=ckpt)
    greedy = ExpertPlacementCallback(policy="greedy", interval=1, min_gain=float("-inf"), heatmap_every=0)
    other_policy = tiny.fit(Path(corpus), model, ep=2, steps=6, extra_slots=1, resume=ckpt, callbacks=[greedy])
    return full, saved_placement, other_policy, greedy.switches


def _crash_mid_migration(corpus: str, save: str):
    model = tiny.model_config(num_experts=8)
    tiny.fit(Path(corpus), model, ep=2, steps=6, extra_slots=1, save_dir=Path(save),
             callbacks=[CrashInMigration(at=4), RandomSwitches(1)])


@pytest.mark.timeout(300)
def test_checkpoints_do_not_depend_on_placement(corpus, tmp_path):
    full, saved_placement, other_policy, greedy_switches = run_distributed(
        2, _save_switching_then_resume, str(corpus), str(tmp_path), timeout=280)[0]
    losses, params = full[0], tiny.weights(full[1])
    assert_same_run(saved_placement, (losses[4:], params))
    assert greedy_switches > 0
    assert_same_run(other_policy, (losses[4:], params))
    single = tiny.fit(corpus, tiny.model_config(num_experts=8), steps=6, resume=tmp_path / "epoch=0-step=4.ckpt")
    assert_same_run(single, (losses[4:], params))


@pytest.mark.timeout(300)
def test_rank_dying_mid_migration_leaves_last_checkpoint_loadable(corpus, tmp_path):
    with pytest.raises(RuntimeError, match="rank 1 died during migration"):
        run_distributed(2, _crash_mid_migration, str(corpus), str(tmp_path), timeout=200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt"]  # nothing half-written
    reference = tiny.fit(corpus, tiny.model_config(num_experts=8), steps=6)
    resumed = tiny.fit(corpus, tiny.model_config(num_experts=8), steps=6, resume=tmp_path / "epoch=0-step=2.ckpt")
    assert_same_run(resumed, (reference[0][2:], tiny.weights(reference[1])))
