"""Faults: a rank that raises ends the whole job; a rank killed during a save leaves the previous checkpoint whole,
and what interrupted saves leave behind is cleaned up at the next start."""

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import cli
from distributed import run_distributed
from lightning_smartmoe import MoEConfig, MoELayer
from lightning_smartmoe.checkpoint import load, newest, read_meta, recover, save, validate
from lightning_smartmoe.models import GPTMoE
from lightning_smartmoe.planner.profile import agree, expert_flops_per_s, link_bandwidth

TESTS = Path(__file__).parent


def trained_layer() -> tuple[MoELayer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layer = MoELayer(8, 16, MoEConfig(num_experts=2, top_k=1))
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    y, aux = layer(torch.randn(2, 5, 8))
    (y.square().sum() + aux).backward()
    opt.step()
    return layer, opt


def _calibrate_then_die_in_a_save(folder: Path) -> dict:
    """On 2 ranks: calibrate (every rank must hold the same figures), save a checkpoint, then save again with rank
    1 killed by SIGKILL right after it wrote its shard. Rank 0 returns what it saw."""
    cpu = torch.device("cpu")
    figures = agree({"flops_per_s": expert_flops_per_s(8, 16, 64, cpu), "bandwidth": link_bandwidth(dist.group.WORLD, 4096, cpu)}, cpu)
    everyone = [None, None]
    dist.all_gather_object(everyone, figures)
    layer, opt = trained_layer()
    save(folder / "last.ckpt", layer, [opt], {"step": 1})
    if dist.get_rank() == 1:
        write = dcp.FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            write(self, plan, planner).wait()
            os.kill(os.getpid(), signal.SIGKILL)

        dcp.FileSystemWriter.write_data = write_then_die
    with torch.no_grad():
        layer.router.weight.add_(1.0)
    try:
        save(folder / "last.ckpt", layer, [opt], {"step": 2})
    except Exception as err:
        return {"figures": everyone, "error": type(err).__name__, "left": sorted(p.name for p in folder.iterdir())}
    return {"figures": everyone, "error": None, "left": sorted(p.name for p in folder.iterdir())}


@pytest.mark.timeout(200)
def test_rank_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    seen = run_distributed(2, _calibrate_then_die_in_a_save, tmp_path, timeout=180, dies=frozenset({1}))[0]
    assert seen["error"] is not None  # the save failed on the surviving rank ...
    assert seen["left"] == ["last.ckpt"]  # ... which removed its temporary folder
    assert seen["figures"][0] == seen["figures"][1]  # calibration: bit-identical figures on every rank
    assert seen["figures"][0]["flops_per_s"] > 0 and seen["figures"][0]["bandwidth"] > 0
    assert read_meta(tmp_path / "last.ckpt")["step"] == 1
    layer, opt = trained_layer()
    fresh = MoELayer(8, 16, MoEConfig(num_experts=2, top_k=1))
    load(tmp_path / "last.ckpt", fresh, [], read_meta(tmp_path / "last.ckpt"))
    assert torch.equal(fresh.router.weight, layer.router.weight) and torch.equal(fresh.experts.w1, layer.experts.w1)


def test_recover_finishes_or_removes_interrupted_saves(tmp_path):
    layer, opt = trained_layer()
    save(tmp_path / "last.ckpt", layer, [opt], {"step": 1})
    save(tmp_path / "done.ckpt", layer, [opt], {"step": 2})
    (tmp_path / "done.ckpt").rename(tmp_path / ".last.ckpt.0123abcd.tmp")  # complete: written, not yet renamed
    save(tmp_path / "half.ckpt", layer, [opt], {"step": 3})
    (tmp_path / "half.ckpt" / "meta.pt").unlink()
    (tmp_path / "half.ckpt").rename(tmp_path / ".epoch=0-step=3.ckpt.89abcdef.tmp")  # killed before meta.pt
    save(tmp_path / "old.ckpt", layer, [opt], {"step": 0})
    (tmp_path / "old.ckpt").rename(tmp_path / ".last.ckpt.fedcba98.old")
    (tmp_path / "notes.tmp").mkdir()  # not ours: left alone
    assert newest(tmp_path) == tmp_path / "last.ckpt"
    done = recover(tmp_path)
    assert done == ["removed .epoch=0-step=3.ckpt.89abcdef.tmp", ".last.ckpt.0123abcd.tmp -> last.ckpt", "removed .last.ckpt.fedcba98.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "notes.tmp"]
    assert read_meta(tmp_path / "last.ckpt")["step"] == 2
    assert recover(tmp_path) == []


def _died(proc, seen) -> bool:
    return bool(seen) and not all(cli.alive(c) for c in seen)


def _kill_rank_1_after_step_2(folder: Path):
    def poll(proc, seen) -> bool:
        if seen and (folder / "checkpoints" / "epoch=0-step=2.ckpt" / "meta.pt").is_file():
            os.kill(min(seen), signal.SIGKILL)
            return True
        return False
    return poll


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["raise", "sigkill"])
def test_a_rank_that_raises_or_dies_ends_the_job_within_the_timeout(tmp_path, fault):
    """Rank 1 of a 2-process run (ep=2, balanced placement with calibrated cost figures) raises after step 3, or is
    killed with SIGKILL after step 2: every process is gone well within parallel.timeout_s of rank 1's end, with a
    non-zero exit code, and the checkpoint written before stays loadable."""
    extra = ("+callbacks.fault._target_=faults.RaiseOnRank",) if fault == "raise" else ()
    run = cli.run(
        "lightning_smartmoe.train", "recipe=gpt_moe_tiny", "trainer.devices=2", "parallel.ep=2", "parallel.timeout_s=30",
        "placement.policy=balanced", "placement.calibrate=true", "trainer.max_steps=50", "trainer.enable_progress_bar=false",
        "checkpoint_every_n_steps=2", *extra, f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout=240,
        on_poll=_died if fault == "raise" else _kill_rank_1_after_step_2(tmp_path),
        env={"PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])},
    )
    print(f"\nrank 1 {fault}: exit {run.returncode}, all gone {run.all_gone_after_s:.1f} s after it ended")
    assert run.returncode not in (0, 130, 143), run.stderr[-2000:]
    if fault == "raise":
        assert "fault injected on rank 1 after step 3" in run.stderr
    assert len(run.children_seen) == 1 and run.all_gone_after_s is not None
    assert run.all_gone_after_s < 30, run.all_gone_after_s  # safety bound: parallel.timeout_s
    saved = newest(tmp_path / "checkpoints")
    meta = read_meta(saved)
    assert meta["global_step"] >= 2
    with torch.device("meta"):
        validate(saved, torch.nn.ModuleDict({"model": GPTMoE(meta["hyper_parameters"]["model"])}))
