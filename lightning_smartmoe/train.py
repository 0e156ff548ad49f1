"""smartmoe-train: train GPT-MoE from the Hydra config (`python -m lightning_smartmoe.train`)."""

import json
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from lightning_smartmoe import config
from lightning_smartmoe.callbacks import TokensPerSecond
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.models import GPTMoEModule
from lightning_smartmoe.planner import memory
from lightning_smartmoe.strategy import SmartMoEStrategy


def _strategy(cfg: DictConfig, sizes) -> SmartMoEStrategy:
    return SmartMoEStrategy(
        dp=sizes.dp, tp=sizes.tp, pp=sizes.pp, ep=sizes.ep, microbatches=cfg.parallel.microbatches,
        pp_schedule=cfg.parallel.pp_schedule, virtual_stages=cfg.parallel.virtual_stages, sequence_parallel=cfg.parallel.sequence_parallel, expert_tp=sizes.expert_tp,
        start_method=cfg.parallel.start_method, bucket_mb=cfg.parallel.bucket_mb, extra_slots=cfg.placement.extra_slots,
        zero=cfg.parallel.zero,
    )


def _check(cfg: DictConfig, load_data: bool):
    """Every check of the config, before anything starts: (model config, sizes, strategy, data). Raises
    ConfigError."""
    config.check_run(cfg)
    model_cfg = config.model_config(cfg)
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
    model_cfg, sizes, _, _ = _check(cfg, load_data=False)
    rows = memory.rank_memory(model_cfg, config.memory_layout(cfg, sizes))
    return memory.table(rows) + "\n" + json.dumps(memory.report(rows))


def build(cfg: DictConfig, output_dir: Path) -> tuple[pl.Trainer, GPTMoEModule, pl.LightningDataModule]:
    """Check the whole config and build trainer, module and data. Raises ConfigError on bad input."""
    model_cfg, sizes, strategy, dm = _check(cfg, load_data=True)
    pl.seed_everything(cfg.seed, workers=True)
    module = GPTMoEModule(model_cfg, config.optim_config(cfg))
    placement = config.placement_callback(cfg)
    checkpoints = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", save_last=True, every_n_train_steps=cfg.checkpoint_every_n_steps
    )
    logger = hydra.utils.instantiate(cfg.logger)
    trainer = pl.Trainer(strategy=strategy, logger=logger, callbacks=[checkpoints, TokensPerSecond(), placement], **cfg.trainer)
    return trainer, module, dm


def run(cfg: DictConfig) -> None:
    try:
        if cfg.dry_run:
            print(dry_run(cfg))
            return
        trainer, module, dm = build(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        print(f"smartmoe-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    trainer.fit(module, dm, ckpt_path=cfg.ckpt_path)


def main() -> None:
    config.register_recipes()
    hydra.main(config_path=str(config.conf_dir()), config_name="train", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
