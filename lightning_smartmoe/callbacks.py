"""Training callbacks."""

import csv
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_smartmoe import plots
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.moe import MoELayer
from lightning_smartmoe.placement import PLANNERS, Placement, SwitchRule, moves, plan
from lightning_smartmoe.planner.cost import ExpertLayerCost, expert_layer_cost
from lightning_smartmoe.planner.hardware import Hardware, resolve
from lightning_smartmoe.planner.profile import agree, expert_flops_per_s, link_bandwidth


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes `last.ckpt` when training ends at a step it has not saved yet (a stop on a
    signal, or max_steps between two validations), so that `last.ckpt` is always the newest save."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TokensPerSecond(pl.Callback):
    """Logs `train/tokens_per_s`: tokens of the global micro-batch (this rank's batch [B, S] times the
    data-parallel size) per wall second between consecutive training batches. Shown in the progress bar."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            kwargs = trainer.strategy.distributed_sampler_kwargs or {}
            tokens = batch[0].numel() * kwargs.get("num_replicas", 1)
            pl_module.log("train/tokens_per_s", tokens / (now - self._last), prog_bar=True)
        self._last = now


class ExpertPlacementCallback(pl.Callback):
    """SmartMoE's online stage: gathers per-expert token counts, logs load telemetry and switches expert
    placement between optimizer steps when a planner finds one that pays for itself.

    After every optimizer step one all-reduce (over all ranks, all layers of the whole model at once; a
    pipeline stage fills the rows of its own layers) totals the step's per-layer expert counts and dropped
    assignments. The last `window` steps' counts feed the planner
    (`policy`: static, greedy or balanced) every `interval` steps (or at each epoch end, interval="epoch").
    A new placement is adopted if the online rule (placement/online.py) finds that the time it saves over its
    expected lifetime exceeds its migration time by `min_gain` seconds; every rank computes the same decision.
    Placements are priced by the planner's cost model (planner/cost.py ExpertLayerCost) for the layer's expert
    shape and the strategy's layout on `hardware` (a built-in datasheet profile or a smartmoe-profile file);
    with `calibrate`, the expert FFN's throughput and the expert-parallel group's link are measured instead after
    the first step (planner/profile.py: the expert FFN at the layer's shape and routed rows, an all-to-all of one
    expert's migration bytes inside the group) and agreed over the ranks. When the strategy exchanges replica
    gradients during backward, a layer's exchange is charged net of the backward of the MoE layers before it on
    its rank (the first min(position, 2) phases hide).

    Logged: `moe/layer<i>/rank_imbalance` (busiest rank's expert tokens over the mean rank's, under the
    current placement; every layer of the model, on every rank), `moe/layer<i>/dropped`, `placement/switches`,
    `placement/moved_experts`. Every `heatmap_every` steps the per-expert load [layers, experts] is appended to
    `expert_load.csv` in the logger's directory, drawn (plots.expert_load_figure) to
    `image_dir/step_<step>.png` (default: the logger's directory, else the trainer's root directory) and added
    to every TensorBoard logger as the image `moe/expert_load`.
    """

    def __init__(
        self,
        policy: str = "static",
        interval: int | str = 100,
        window: int = 2,
        min_gain: float = 0.0,
        heatmap_every: int = 100,
        hardware: str | Hardware = "h100",
        calibrate: bool = False,
        image_dir: str | Path | None = None,
    ) -> None:
        if policy not in PLANNERS:
            raise ConfigError(f"placement.policy={policy!r} is unknown; allowed: {', '.join(PLANNERS)}")
        if interval != "epoch" and not (isinstance(interval, int) and interval >= 1):
            raise ConfigError(f"placement.interval={interval!r} must be an integer >= 1 or 'epoch'")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"placement.window={window!r} must be an integer >= 1")
        self.policy, self.interval, self.window, self.min_gain = policy, interval, window, min_gain
        self.heatmap_every = heatmap_every
        self.hardware = hardware if isinstance(hardware, Hardware) else resolve(hardware)
        self.calibrate = calibrate
        self.measured: dict[str, float] = {}  # the calibrated figures, once measured
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.history: list[torch.Tensor] = []  # last `window` steps' global counts, [layers, experts] each
        self.switches = 0
        self.moved_experts = 0
        self.switch_steps: list[int] = []  # steps at which some layer switched, this fit
        self.imbalance: list[tuple[int, list[float]]] = []  # (step, rank imbalance of every layer), this fit
        self.placements: list[Placement] = []  # every layer's current placement (all pipeline stages)
        self.images: list[Path] = []  # heatmap PNGs written by this rank
        self.rules: dict[int, SwitchRule] = {}  # per MoE layer index: the switch rule and its observed loads
        self._pending: torch.Tensor | None = None  # this rank's counts since the last step, [layers, E + 1]
        self._last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self.switch_steps, self.imbalance = [], []
        if trainer.strategy.moe_num_experts:
            self.placements = self._all_placements(trainer)

    @staticmethod
    def _all_placements(trainer: pl.Trainer) -> list[Placement]:
        """Every MoE layer's placement, from all pipeline stages (collective)."""
        strategy = trainer.strategy
        tables = strategy.placement_tables()
        return [Placement(e, strategy.sizes.ep, tuple(t)) for e, t in zip(strategy.moe_num_experts, tables)]

    @staticmethod
    def _layers(trainer: pl.Trainer) -> list[MoELayer]:
        return [m for m in trainer.lightning_module.modules() if isinstance(m, MoELayer)]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        experts = trainer.strategy.moe_num_experts  # per MoE layer of the whole model
        if not experts:
            return
        counts = torch.zeros(len(experts), max(experts) + 1, dtype=torch.long, device=trainer.strategy.root_device)
        for m in self._layers(trainer):
            counts[m.index, : m.cfg.num_experts] = m.stats.expert_load
            counts[m.index, -1] = m.stats.dropped
        self._pending = counts if self._pending is None else self._pending + counts
        if trainer.global_step == self._last_step:
            return  # inside gradient accumulation: no optimizer step yet
        self._last_step = trainer.global_step
        total = trainer.strategy.reduce(self._pending, reduce_op="sum")
        self._pending = None
        load, dropped = total[:, :-1].double().cpu(), total[:, -1]
        self.history = (self.history + [load])[-self.window :]
        for layer in self._layers(trainer):
            self.rules.setdefault(layer.index, SwitchRule(self.min_gain)).observe(self._group_load(trainer, layer, load))
        if self.calibrate and not self.measured and self.policy != "static":
            self._calibrate(trainer)
        imbalance = [p.rank_imbalance(load[i, : p.num_experts]) for i, p in enumerate(self.placements)]
        self.imbalance.append((trainer.global_step, imbalance))
        for i, value in enumerate(imbalance):
            pl_module.log(f"moe/layer{i}/rank_imbalance", value)
            pl_module.log(f"moe/layer{i}/dropped", float(dropped[i]))
        if self.heatmap_every and trainer.global_step % self.heatmap_every == 0:
            self._log_heatmap(trainer, load)
        if self.interval != "epoch" and trainer.global_step % self.interval == 0:
            self.replan(trainer, steps=self.interval)

    def _calibrate(self, trainer: pl.Trainer) -> None:
        """Measure the expert FFN's FLOP/s and the expert-parallel link on these ranks (collective) and price
        placements with them instead of the hardware profile's. A rank whose pipeline stage holds no MoE layer
        measures nothing (nor do the others of its expert-parallel group, which is that stage's too)."""
        strategy, start = trainer.strategy, time.perf_counter()
        layers = self._layers(trainer)
        figures: dict[str, float | None] = {"flops_per_s": None, "bandwidth": None}
        if layers:
            layer = layers[0]
            _, d_model, hidden = layer.experts.w1.shape
            rows = max(1, int(layer.stats.expert_load.sum()))  # the assignments this rank routed in the last batch
            with trainer.precision_plugin.forward_context():
                figures["flops_per_s"] = expert_flops_per_s(d_model, hidden, rows, strategy.root_device, layer.experts.w1.dtype)
            if strategy.layout.mesh is not None:
                nbytes = round(self._layer_cost(trainer, layer, 0).state_bytes)
                figures["bandwidth"] = link_bandwidth(strategy.layout.ep_group, nbytes, strategy.root_device)
        self.measured = {k: v for k, v in agree(figures, strategy.root_device).items() if v is not None}
        self.hardware = self.hardware.calibrated(self.measured["flops_per_s"], self.measured.get("bandwidth"),
                                                 (2, strategy.sizes.ep))
        link = f", link {self.measured['bandwidth'] / 1e9:.2f} GB/s" if "bandwidth" in self.measured else ""
        rank_zero_info(f"placement: cost figures measured in {time.perf_counter() - start:.2f} s: expert FFN "
                       f"{self.measured['flops_per_s'] / 1e9:.1f} GFLOP/s per rank{link}")

    def _layer_cost(self, trainer: pl.Trainer, layer: MoELayer, hidden_phases: int) -> ExpertLayerCost:
        """The planner's price of `layer`'s placements under the strategy's layout."""
        strategy = trainer.strategy
        _, d_model, hidden = layer.experts.w1.shape  # this rank's share of each expert's hidden units
        micro = getattr(strategy, "microbatches", 1) * trainer.accumulate_grad_batches
        return expert_layer_cost(self.hardware, strategy.sizes, d_model, hidden, str(trainer.precision), micro,
                                 hidden_phases=hidden_phases, matrices=layer.experts.params_per_expert // (d_model * hidden))

    @staticmethod
    def _group_load(trainer: pl.Trainer, layer: MoELayer, load: torch.Tensor) -> torch.Tensor:
        """[E] the rows per step one expert-parallel group computes for each expert of `layer`: the global counts
        of the [layers, max E] table split over the stage's edp groups, which see the same experts."""
        return load[layer.index, : layer.cfg.num_experts] / trainer.strategy.sizes.edp

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch" and self.history:
            self.replan(trainer, steps=max(1, trainer.num_training_batches // trainer.accumulate_grad_batches))

    def replan(self, trainer: pl.Trainer, steps: int) -> None:
        """Run the planner on the windowed load of every layer and migrate the layers whose switch pays."""
        if self.policy == "static" or not self.history:
            return
        load = torch.stack(self.history).mean(0)
        overlapped = getattr(trainer.strategy, "replica_sync_overlapped", False)
        switched = False
        for position, layer in enumerate(self._layers(trainer)):
            cost = self._layer_cost(trainer, layer, position if overlapped else 0)
            new = plan(self.policy, self._group_load(trainer, layer, load), layer.placement, cost)
            rule = self.rules.setdefault(layer.index, SwitchRule(self.min_gain))
            if rule.should_switch(cost, layer.placement, new, len(self.history), steps_per_load=1, min_steps=steps):
                self.moved_experts += sum(not m.local for m in moves(layer.placement, new))
                self.switches += 1
                trainer.strategy.migrate(layer, new)
                switched = True
        if self.placements:
            self.placements = self._all_placements(trainer)
        if switched:
            self.switch_steps.append(trainer.global_step)
        trainer.lightning_module.log("placement/switches", float(self.switches))
        trainer.lightning_module.log("placement/moved_experts", float(self.moved_experts))

    def _log_heatmap(self, trainer: pl.Trainer, load: torch.Tensor) -> None:
        if not trainer.is_global_zero:
            return
        log_dir = trainer.logger.log_dir if trainer.logger is not None else None
        if log_dir is not None:
            path = Path(log_dir) / "expert_load.csv"
            new_file = not path.exists()
            with path.open("a", newline="") as f:
                writer = csv.writer(f)
                if new_file:
                    writer.writerow(["step", "layer", *[f"expert{e}" for e in range(load.shape[1])]])
                for i, row in enumerate(load.tolist()):
                    writer.writerow([trainer.global_step, i, *[int(v) for v in row]])
        if not self.placements:
            return
        fig = plots.expert_load_figure(load, self.placements, trainer.global_step)
        image_dir = self.image_dir or Path(log_dir or trainer.default_root_dir) / "expert_load"
        self.images.append(plots.save_png(fig, image_dir / f"step_{trainer.global_step:06d}.png"))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("moe/expert_load", plots.rgb(fig), trainer.global_step, dataformats="HWC")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "switches": self.switches, "moved_experts": self.moved_experts,
                "rule_loads": {i: rule.loads for i, rule in self.rules.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [h.cpu() for h in state_dict["history"]]
        self.switches = state_dict["switches"]
        self.moved_experts = state_dict["moved_experts"]
        self.rules = {i: SwitchRule(self.min_gain, [x.cpu() for x in loads])
                      for i, loads in state_dict.get("rule_loads", {}).items()}

