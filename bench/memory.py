"""Memory per rank: start-up peak against the rank's share, one training step under ZeRO 0/1/2, and the dry run
of SmartMoE's published plans.

    .venv/bin/python bench/memory.py [--experts 128] [--zero-experts 32]

1. Start-up, 4 gloo ranks, ep=4, fp32: GPTMoE with 2 MoE layers of --experts experts (d_model 256, expert hidden
   1024: 128 experts are 537 MB of expert weights). Each rank measures its peak resident set (VmHWM, reset through
   /proc/self/clear_refs) from before the Trainer starts until setup is done (Lightning's on_fit_start: the model
   materialised, the optimizer built), three times in one process: an empty model (d_model 8, 1 expert: the
   baseline of interpreter, Lightning and communication buffers), the model built on the meta device (the
   strategy's path), and the same model built whole in __init__ (the path before meta-device construction). Figure:
   (peak - baseline) / the rank's share (bytes of the parameters it keeps). Target: meta <= 1.5.
2. One training step at dp=4 (ep=1, so experts are replicated and cut too) for zero 0, 1, 2, --zero-experts
   experts: per rank the bytes it holds (parameters; gradients after backward, before the ZeRO reduction; gradients
   when the optimizer steps; optimizer state after the step, fp32 masters included), the peak of activations
   saved for backward, and VmHWM over the step minus VmRSS before it. Target: optimizer bytes at zero=1 <= 1/4 of
   zero=0 + one gradient bucket (25 MiB).
3. The dry run (planner.memory) of the four paper recipes at their published plans, bf16-mixed: max bytes per
   rank and the largest term.

The last line printed is one JSON object with every figure.
"""

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # run_distributed
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed import run_distributed  # noqa: E402
from machine import reset_peak_rss, vm_mib  # noqa: E402

import lightning.pytorch as pl  # noqa: E402

from lightning_smartmoe import SmartMoEStrategy  # noqa: E402
from lightning_smartmoe.data import TokenDataModule  # noqa: E402
from lightning_smartmoe.layout import ParallelSizes  # noqa: E402
from lightning_smartmoe.models import GPTMoE, GPTMoEConfig, MoELMModule, OptimConfig  # noqa: E402
from lightning_smartmoe.moe import MoEConfig  # noqa: E402
from lightning_smartmoe.planner.memory import Layout, SavedActivations, largest, rank_memory  # noqa: E402

MIB = 2**20
WORLD = 4
PLANS = {  # recipe: (pp, dp, ep, micro-batches) as SmartMoE published them
    "smartmoe_gpt_16l_d2560_e16": (4, 4, 2, 8),
    "smartmoe_gpt_16l_d1536_e64": (4, 16, 8, 8),
    "smartmoe_gpt_16l_d2560_e32": (4, 8, 4, 8),
    "smartmoe_gpt_8l_d2048_e32": (2, 8, 8, 8),
}


def model_config(experts: int, d_model: int = 256) -> GPTMoEConfig:
    moe = MoEConfig(num_experts=experts, top_k=min(2, experts), expert_hidden=4 * d_model)
    return GPTMoEConfig(vocab_size=256, seq_len=64, n_layers=2, d_model=d_model, n_heads=4, moe=moe)


class EagerModule(MoELMModule):
    """MoELMModule building its whole model in __init__, as before meta-device construction."""

    def __init__(self, model: GPTMoEConfig, optim: OptimConfig) -> None:
        super().__init__(model, optim)
        self.model = GPTMoE(model)


class AtSetup(pl.Callback):
    """Peak RSS from the Trainer's start to the end of setup, then stop."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.peak_mib = vm_mib("VmHWM")
        self.share = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        trainer.should_stop = True


class OneStep(pl.Callback):
    """Bytes held around one training step (see the module docstring)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.params = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        self.saved = SavedActivations({p.untyped_storage().data_ptr() for p in pl_module.parameters()})
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.saved.pack, self.saved.unpack)
        self.hooks.__enter__()
        self.rss_before = vm_mib("VmRSS")
        reset_peak_rss()

    def on_after_backward(self, trainer, pl_module) -> None:
        self.grads_after_backward = _grad_bytes(p for p in pl_module.parameters())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads_at_step = _grad_bytes(t for group in optimizer.param_groups for t in group["params"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.hooks.__exit__(None, None, None)
        self.rss_peak = vm_mib("VmHWM") - self.rss_before
        opt = trainer.optimizers[0]
        stepped = [t for group in opt.param_groups for t in group["params"]]
        own = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        self.optimizer = sum(v.numel() * v.element_size() for t in stepped for v in opt.state[t].values() if v.shape == t.shape)
        self.optimizer += sum(t.numel() * t.element_size() for t in stepped if t.untyped_storage().data_ptr() not in own)
        trainer.should_stop = True


def _grad_bytes(tensors) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in tensors if t.grad is not None)


def _trainer(corpus: str, strategy: SmartMoEStrategy, callback: pl.Callback) -> tuple[pl.Trainer, TokenDataModule]:
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback])
    return trainer, TokenDataModule(corpus, seq_len=64, global_batch_size=8, vocab_size=256)


def worker(corpus: str, experts: int, zero_experts: int) -> dict:
    torch.set_num_threads(1)
    out = {"rank": dist.get_rank()}
    for name, module in [
        ("empty", lambda: MoELMModule(model_config(WORLD, d_model=8), OptimConfig())),
        ("meta", lambda: MoELMModule(model_config(experts), OptimConfig())),
        ("eager", lambda: EagerModule(model_config(experts), OptimConfig())),
    ]:
        reset_peak_rss()
        at = AtSetup()
        trainer, dm = _trainer(corpus, SmartMoEStrategy(ep=WORLD), at)
        trainer.fit(module(), dm)
        out[name] = {"peak_mib": at.peak_mib, "share_mib": at.share / MIB}
        del trainer, dm
        gc.collect()
    for zero in (0, 1, 2):
        step = OneStep()
        trainer, dm = _trainer(corpus, SmartMoEStrategy(zero=zero), step)
        trainer.fit(MoELMModule(model_config(zero_experts), OptimConfig()), dm)
        out[f"zero{zero}"] = {
            "params_mib": step.params / MIB, "grads_after_backward_mib": step.grads_after_backward / MIB,
            "grads_at_step_mib": step.grads_at_step / MIB, "optimizer_mib": step.optimizer / MIB,
            "activations_mib": step.saved.peak / MIB, "rss_step_peak_mib": step.rss_peak,
        }
        del trainer, dm
        gc.collect()
    return out


def dry_runs() -> dict:
    from omegaconf import OmegaConf

    from lightning_smartmoe.config import conf_dir, model_config as recipe_model

    out = {}
    for recipe, (pp, dp, ep, microbatches) in PLANS.items():
        base = OmegaConf.create({"model": OmegaConf.load(conf_dir() / "model" / "gpt_moe.yaml"),
                                 "moe": OmegaConf.load(conf_dir() / "moe" / "default.yaml")})
        cfg = OmegaConf.merge(base, OmegaConf.load(Path(conf_dir()).parent / "recipes" / f"{recipe}.yaml"))
        layout = Layout(ParallelSizes(dp=dp, pp=pp, ep=ep), microbatches=microbatches, precision="bf16-mixed",
                        global_batch=cfg.data.global_batch_size)
        worst = largest(rank_memory(recipe_model(cfg), layout))
        terms = {k: v for k, v in worst.as_dict().items() if k.endswith("_bytes") and k != "total_bytes"}
        out[recipe] = {"plan": f"p{pp} d{dp} ep{ep} mb{microbatches}", "ranks": pp * dp,
                       "max_total_gib": round(worst.total_bytes / 2**30, 2), "rank": worst.rank,
                       **{k.removesuffix("_bytes") + "_gib": round(v / 2**30, 2) for k, v in terms.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--zero-experts", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(0, 256, size=1 << 16, dtype=np.uint16).tofile(corpus)
        ranks = run_distributed(WORLD, worker, str(corpus), args.experts, args.zero_experts, timeout=args.timeout)
    startup = []
    for r in ranks:
        base, meta, eager = r["empty"]["peak_mib"], r["meta"], r["eager"]
        startup.append({"rank": r["rank"], "share_mib": round(meta["share_mib"], 1),
                        "meta_over_share": round((meta["peak_mib"] - base) / meta["share_mib"], 3),
                        "eager_over_share": round((eager["peak_mib"] - base) / eager["share_mib"], 3)})
    zero = {f"zero{z}": {k: round(max(r[f"zero{z}"][k] for r in ranks), 2) for k in ranks[0][f"zero{z}"]} for z in (0, 1, 2)}
    bound = zero["zero0"]["optimizer_mib"] / WORLD + 25
    figures = {
        "startup": startup,
        "startup_target_met": all(s["meta_over_share"] <= 1.5 for s in startup),
        "zero_step_max_over_ranks": zero,
        "zero1_optimizer_bound_mib": round(bound, 2),
        "zero1_target_met": zero["zero1"]["optimizer_mib"] <= bound,
        "dry_run": dry_runs(),
    }
    print(f"{'rank':>4} {'share MiB':>10} {'meta/share':>11} {'eager/share':>12}")
    for s in startup:
        print(f"{s['rank']:>4} {s['share_mib']:>10} {s['meta_over_share']:>11} {s['eager_over_share']:>12}")
    for z, row in zero.items():
        print(z, row)
    for recipe, row in figures["dry_run"].items():
        print(recipe, row)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
