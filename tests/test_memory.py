"""Meta-device construction and the memory model: a rank holds exactly its share after setup, and the dry run's
figures are the bytes a real 4-rank run holds (parameters, gradients, optimizer state exactly; activations within
20% of the measured peak of saved tensors)."""

import gc
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

import tiny
from distributed import run_distributed
from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.models.gpt_moe import GPTMoE
from lightning_smartmoe.planner.memory import Layout, SavedActivations, rank_memory

MODEL = dict(num_experts=8)
LAYOUTS = {  # tiny.fit keyword arguments and the same layout for the memory model (4 ranks, float64)
    "pp2_dp2_ep2_zero1_mb2": (dict(pp=2, ep=2, microbatches=2, zero=1),
                              Layout(ParallelSizes(dp=2, pp=2, ep=2), microbatches=2, zero=1, precision="64-true", global_batch=8)),
    "tp2_dp2_ep2_sequence_parallel": (dict(tp=2, ep=2, sequence_parallel=True),
                                      Layout(ParallelSizes(dp=2, tp=2, ep=2), sequence_parallel=True, precision="64-true", global_batch=8)),
}


def _tensor_bytes() -> int:
    """Bytes of every storage of every tensor this process holds (each storage once; meta tensors hold none), after
    collecting garbage (earlier fits' tensors in reference cycles)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            s = obj.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


class Held(pl.Callback):
    """What the rank holds: every tensor after setup; parameters; gradients after the first backward; optimizer
    state after the first step; the peak of saved activations over the training steps."""

    def setup(self, trainer, pl_module, stage) -> None:
        self.before_setup = _tensor_bytes()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.after_setup = _tensor_bytes()
        self.params = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        self.saved = SavedActivations({p.untyped_storage().data_ptr() for p in pl_module.parameters()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.saved.pack, self.saved.unpack)
        self.hooks.__enter__()

    def on_after_backward(self, trainer, pl_module) -> None:
        if not hasattr(self, "grads"):
            self.grads = sum(p.grad.numel() * p.grad.element_size() for p in pl_module.parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.hooks.__exit__(None, None, None)
        if not hasattr(self, "optimizer"):
            opt = trainer.optimizers[0]
            stepped = [t for group in opt.param_groups for t in group["params"]]
            params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
            state = sum(v.numel() * v.element_size() for t in stepped for v in opt.state[t].values() if v.shape == t.shape)
            masters = sum(t.numel() * t.element_size() for t in stepped if t.untyped_storage().data_ptr() not in params)
            self.optimizer = state + masters


def _measure(corpus: str) -> dict:
    out = {}
    for name, (kw, _) in LAYOUTS.items():
        held = Held()
        tiny.fit(Path(corpus), tiny.model_config(**MODEL), steps=2, callbacks=[held], **kw)
        out[name] = dict(params=held.params, grads=held.grads, optimizer=held.optimizer, activations=held.saved.peak)
    held = Held()
    tiny.fit(Path(corpus), tiny.model_config(**MODEL), ep=4, extra_slots=1, steps=1, callbacks=[held])
    out["dp4_ep4_setup"] = (held.before_setup, held.after_setup, held.params)
    return dict(out, rank=dist.get_rank())


@pytest.fixture(scope="module")
def measured(corpus):
    return run_distributed(4, _measure, str(corpus), timeout=300)


@pytest.mark.timeout(360)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dry_run_figures_are_what_a_real_run_holds(measured, name):
    """Activations differ between ranks of a stage with the tokens their experts received; the model assumes
    balanced routing."""
    rows = rank_memory(tiny.model_config(**MODEL), LAYOUTS[name][1])
    for held in measured:
        row, got = rows[held["rank"]], held[name]
        assert (row.params_bytes, row.grads_bytes, row.optimizer_bytes) == (got["params"], got["grads"], got["optimizer"])
        assert abs(row.activations_bytes - got["activations"]) <= 0.2 * got["activations"], (row, got)


@pytest.mark.timeout(360)
def test_a_rank_materialises_exactly_its_share(measured):
    """dp=4, ep=4, one extra slot: each rank holds the dense parameters and 2 + 1 of the 8 experts' slots of each
    layer, and after setup every tensor in the process adds up to those parameters plus less than 64 KiB
    (random-number states, index tables); the whole model is 3.3x that."""
    cfg = tiny.model_config(**MODEL)
    full = GPTMoE(cfg).double()
    experts = sum(p.numel() * 8 for n, p in full.named_parameters() if ".experts." in n)
    dense = sum(p.numel() * 8 for n, p in full.named_parameters() if ".experts." not in n)
    share = dense + experts * 3 // 8
    for held in measured:
        before, after, params = held["dp4_ep4_setup"]
        assert params == share
        assert share <= after - before < share + 64 * 1024, (after - before, share)


@pytest.mark.timeout(120)
def test_dry_run_of_a_paper_plan_in_one_process(tmp_path):
    """SmartMoE's 64-GPU plan p4 d16 ep8 (16 layers, d 1536, 64 experts): one process, no devices, every rank."""
    result = subprocess.run(
        [sys.executable, "-m", "lightning_smartmoe.train", "recipe=smartmoe_gpt_16l_d1536_e64", "trainer.devices=8",
         "trainer.num_nodes=8", "parallel.pp=4", "parallel.ep=8", "parallel.microbatches=8", "dry_run=true",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=110, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    ranks = figures["ranks"]
    assert sum(r["count"] for r in ranks) == 64 and sorted({r["stage"] for r in ranks}) == [0, 1, 2, 3]
    assert figures["max_total_bytes"] == max(r["total_bytes"] for r in ranks)
    for r in ranks:
        assert r["total_bytes"] == sum(r[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes"))
    # 1F1B keeps pp - stage micro-batches in flight: the first stage holds the most activations
    assert [r["activations_bytes"] for r in sorted(ranks, key=lambda r: r["stage"])] == sorted(
        (r["activations_bytes"] for r in ranks), reverse=True)


@pytest.mark.parametrize("tp,pp,dp,ep,expert_tp,sequence_parallel,zero,precision,virtual_stages,arch", [
    (1, 1, 4, 2, False, False, 1, "32-true", 1, "gpt"), (2, 2, 2, 4, False, True, 2, "bf16-mixed", 1, "gpt"),
    (2, 1, 4, 2, True, True, 1, "bf16-mixed", 1, "gpt"), (1, 2, 2, 2, False, False, 2, "64-true", 2, "gpt"),
    (2, 2, 2, 2, False, False, 1, "32-true", 1, "llama_tied"),  # the last stage keeps a copy of the embedding
])
def test_the_planners_table_counts_what_each_rank_builds(tp, pp, dp, ep, expert_tp, sequence_parallel, zero, precision,
                                                         virtual_stages, arch):
    """ModelTable (one meta build per tensor-parallel cut, reused for every layout the search prices) gives every
    rank the bytes rank_memory counts from the rank's own meta-built part."""
    from lightning_smartmoe.planner.memory import ModelTable, state_bytes

    if arch == "gpt":
        cfg = tiny.model_config(num_experts=8, n_layers=4, every=2)
    else:
        cfg = tiny.llama_config(n_layers=4, every=2, tie=True)
    layout = Layout(ParallelSizes(dp=dp, tp=tp, pp=pp, ep=ep, expert_tp=expert_tp), microbatches=2 if pp > 1 else 1,
                    pp_schedule="interleaved_1f1b" if virtual_stages > 1 else "1f1b", virtual_stages=virtual_stages,
                    sequence_parallel=sequence_parallel, extra_slots=1, zero=zero, precision=precision, global_batch=16)
    table = ModelTable(cfg, tp, sequence_parallel, expert_tp, precision)
    for row in rank_memory(cfg, layout):
        j = row.rank - row.stage * layout.sizes.plane
        dense, experts = j // tp, (j // tp // ep if expert_tp else j // ep)
        got = state_bytes(table.stage_records(layout, row.stage), layout, dense, experts)
        assert got == (row.params_bytes, row.grads_bytes, row.optimizer_bytes), row
