"""smartmoe-train: train GPT-MoE from the Hydra config (`python -m lightning_smartmoe.train`).

Exit codes: 0 when the run finished; 2 for bad input (one line on stderr, before any process starts); 130 or 143
after a stop on SIGINT or SIGTERM, with `last.ckpt` at the stop step (`ckpt_path=last` resumes from it).
"""

import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_smartmoe import checkpoint, config, run_dir
from lightning_smartmoe.callbacks import LastCheckpoint, TokensPerSecond
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.models import MoELMModule
from lightning_smartmoe.planner import memory
from lightning_smartmoe.report import RunReport
from lightning_smartmoe.signals import exit_code
from lightning_smartmoe.strategy import SmartMoEStrategy


def _strategy(cfg: DictConfig, sizes) -> SmartMoEStrategy:
    return SmartMoEStrategy(
        dp=sizes.dp, tp=sizes.tp, pp=sizes.pp, ep=sizes.ep, microbatches=cfg.parallel.microbatches,
        pp_schedule=cfg.parallel.pp_schedule, virtual_stages=cfg.parallel.virtual_stages, sequence_parallel=cfg.parallel.sequence_parallel, expert_tp=sizes.expert_tp,
        start_method=cfg.parallel.start_method, bucket_mb=cfg.parallel.bucket_mb, extra_slots=cfg.placement.extra_slots,
        zero=cfg.parallel.zero, timeout=timedelta(seconds=cfg.parallel.timeout_s),
    )


def check(cfg: DictConfig, load_data: bool, tool_keys: tuple[str, ...] = ()):
    """Every check of the config, before anything starts: (model config, sizes, strategy, data). `tool_keys`: the
    top-level keys of another command that takes smartmoe-train's config (smartmoe-profile). Raises ConfigError."""
    config.check_run(cfg, tool_keys)
    model_cfg = config.model_config(cfg)
    config.choose_layout(cfg, model_cfg)
    config.optim_config(cfg)
    sizes = config.parallel_sizes(cfg)
    sizes.check_experts(model_cfg.moe.num_experts)
    model_cfg.check_parallel(sizes.tp, sizes.pp, sizes.expert_tp, cfg.parallel.virtual_stages)
    strategy = _strategy(cfg, sizes)
    dm = config.datamodule(cfg, model_cfg, sizes, load=load_data)
    config.check_memory(cfg, model_cfg, sizes)
    return model_cfg, sizes, strategy, dm


def dry_run(cfg: DictConfig) -> str:
    """Every rank's predicted memory as each would build it (planner.memory): a table, then one JSON line."""
    model_cfg, sizes, _, _ = check(cfg, load_data=False)
    rows = memory.rank_memory(model_cfg, config.memory_layout(cfg, sizes))
    return memory.table(rows) + "\n" + json.dumps(memory.report(rows))


def build(cfg: DictConfig, output_dir: Path) -> tuple[pl.Trainer, MoELMModule, pl.LightningDataModule, Path | None]:
    """Check the whole config and the checkpoint to resume, and build trainer, module and data. Returns them and
    the checkpoint to resume from (None: start fresh). Raises ConfigError on bad input."""
    model_cfg, sizes, strategy, dm = check(cfg, load_data=True)
    checkpoints = output_dir / "checkpoints"
    if rank_zero_only.rank == 0:
        for line in checkpoint.recover(checkpoints):
            rank_zero_info(f"checkpoints: interrupted save found, {line}")
    ckpt = config.checkpoint_to_resume(cfg, checkpoints)
    if cfg.ckpt_path == "last" and ckpt is None:
        rank_zero_info(f"ckpt_path=last: no checkpoint in {checkpoints} yet, starting fresh")
    if ckpt is not None:  # against the whole model's shapes, allocating nothing
        with torch.device("meta"):
            checkpoint.validate(ckpt, nn.ModuleDict({"model": model_cfg.build()}))  # MoELMModule's names
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = MoELMModule(model_cfg, config.optim_config(cfg))
    callbacks = [
        LastCheckpoint(dirpath=checkpoints, save_last=True, every_n_train_steps=cfg.checkpoint_every_n_steps),
        TokensPerSecond(),
        config.placement_callback(cfg, image_dir=output_dir / "expert_load"),
        RunReport(output_dir),
        *config.callbacks(cfg),
    ]
    trainer = make_trainer(cfg, strategy, logger=config.loggers(cfg) or False, callbacks=callbacks)
    return trainer, module, dm, ckpt


def make_trainer(cfg: DictConfig, strategy: SmartMoEStrategy, **arguments) -> pl.Trainer:
    """pl.Trainer(strategy, the `trainer.*` arguments and `arguments`); ConfigError if Lightning refuses them."""
    try:
        return pl.Trainer(strategy=strategy, **arguments, **cfg.trainer)
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise ConfigError(f"trainer: {err}") from err


def run(cfg: DictConfig) -> None:
    """Build and fit; exit with the code of the outcome (see the module docstring). A ConfigError raised inside the
    ranks (every rank raises the same one) is printed once, by rank 0."""
    try:
        if cfg.dry_run:
            print(dry_run(cfg))
            return
        trainer, module, dm, ckpt = build(cfg, Path(HydraConfig.get().runtime.output_dir))
        trainer.fit(module, dm, ckpt_path=ckpt)
    except ConfigError as err:
        if rank_zero_only.rank == 0:
            print(f"smartmoe-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if trainer.strategy.stop_signal:
        sys.exit(exit_code(trainer.strategy.stop_signal))


def main() -> None:
    # MoELMModule reduces val/loss and val/ppl over the ranks itself; Lightning cannot tell and suggests sync_dist
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/", category=PossibleUserWarning)
    try:  # the default run directory's name, unless hydra.run.dir is given (run_dir.py)
        name = None if any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]) else run_dir.run_name()
    except ConfigError as err:
        print(f"smartmoe-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    OmegaConf.register_new_resolver("run_name", lambda: name or run_dir.run_name(), replace=True)
    config.register_recipes()
    hydra.main(config_path=str(config.conf_dir()), config_name="train", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
