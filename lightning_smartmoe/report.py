"""The end-of-run report of smartmoe-train: a short summary printed by rank 0, `summary.json`, and `curves.png`."""

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_smartmoe import plots
from lightning_smartmoe.callbacks import ExpertPlacementCallback
from lightning_smartmoe.placement import Placement


class RunReport(pl.Callback):
    """Keeps, on rank 0, the global training loss of every step, each validation loss, and the tokens and seconds
    of training steps (validation excluded). When fit ends (max_steps, or a stop on a signal) it prints a summary:
    final validation loss and perplexity, tokens/s, placement switches and experts moved, and each MoE layer's rank
    imbalance at the first and the last step (and what the contiguous placement would give on the last step's
    load); writes it to `out_dir/summary.json`; and draws `out_dir/curves.png` (plots.training_curves_figure)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.tokens = 0
        self.seconds = 0.0
        self._step_start: float | None = None
        self.summary: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train, self.val, self.tokens, self.seconds = [], [], 0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_start is not None:
            self.seconds += time.perf_counter() - self._step_start
            kwargs = trainer.strategy.distributed_sampler_kwargs or {}
            self.tokens += batch[0].numel() * kwargs.get("num_replicas", 1)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and trainer.is_global_zero:
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None and trainer.is_global_zero:
            self.val.append((trainer.global_step, float(loss)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        placement = next((c for c in trainer.callbacks if isinstance(c, ExpertPlacementCallback)), None)
        self.summary = self._summarize(trainer, placement)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        curves = plots.training_curves_figure(
            self.train, self.val, placement.imbalance if placement else [], placement.switch_steps if placement else []
        )
        self.summary["pictures"] = [str(plots.save_png(curves, self.out_dir / "curves.png"))]
        if placement and placement.images:
            self.summary["pictures"].append(str(placement.images[-1]))
        (self.out_dir / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")
        print(format_summary(self.summary), flush=True)

    def _summarize(self, trainer: pl.Trainer, placement: ExpertPlacementCallback | None) -> dict[str, Any]:
        strategy = trainer.strategy
        summary: dict[str, Any] = {
            "steps": trainer.global_step,
            "stopped_by": getattr(strategy, "stop_signal", 0),
            "layout": {k: v for k, v in vars(strategy.sizes).items()} if hasattr(strategy, "sizes") else {},
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
        }
        if self.val:
            step, loss = self.val[-1]
            summary["val"] = {"step": step, "loss": loss, "perplexity": math.exp(loss)}
        if self.train:
            summary["train_loss"] = {"step": self.train[-1][0], "loss": self.train[-1][1]}
        if placement is not None:
            summary["placement"] = {
                "policy": placement.policy, "switches": placement.switches, "moved_experts": placement.moved_experts,
                "cost_measured": placement.measured, "hardware": placement.hardware.name,
            }
            if placement.imbalance and placement.history:
                (first_step, first), (last_step, last) = placement.imbalance[0], placement.imbalance[-1]
                load = placement.history[-1]
                static = [
                    Placement.contiguous(p.num_experts, p.ep).rank_imbalance(load[i, : p.num_experts])
                    for i, p in enumerate(placement.placements)
                ]
                summary["imbalance"] = {"first_step": first_step, "last_step": last_step, "first": first,
                                        "last": last, "last_static": static}
        return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The printed form of a RunReport summary: a few lines."""
    lines = [f"smartmoe-train summary: {summary['steps']} steps"
             + (f" (stopped by signal {summary['stopped_by']})" if summary["stopped_by"] else "")
             + (", " + " ".join(f"{k}={v}" for k, v in summary["layout"].items() if k != "expert_tp") if summary["layout"] else "")]
    if "val" in summary:
        v = summary["val"]
        lines.append(f"  validation loss {v['loss']:.4f} at step {v['step']}, perplexity {v['perplexity']:.2f}")
    if summary["tokens_per_s"]:
        lines.append(f"  throughput {summary['tokens_per_s']:,.0f} tokens/s (training steps, validation excluded)")
    if "placement" in summary:
        p = summary["placement"]
        measured = p["cost_measured"]
        figures = (f"; cost figures measured here: expert FFN {measured['flops_per_s'] / 1e9:.1f} GFLOP/s per rank"
                   + (f", link {measured['bandwidth'] / 1e9:.2f} GB/s" if "bandwidth" in measured else "")) if measured else ""
        lines.append(f"  placement {p['policy']}: {p['switches']} switches, {p['moved_experts']} experts moved{figures}")
    if "imbalance" in summary:
        imb = summary["imbalance"]
        lines.append(f"  rank imbalance (busiest rank / mean) per MoE layer, step {imb['first_step']} -> step "
                     f"{imb['last_step']} (contiguous placement on the last step's load):")
        for i, (a, b, s) in enumerate(zip(imb["first"], imb["last"], imb["last_static"])):
            lines.append(f"    layer {i}: {a:.3f} -> {b:.3f} ({s:.3f})")
    for picture in summary.get("pictures", []):
        lines.append(f"  picture: {picture}")
    return "\n".join(lines)
