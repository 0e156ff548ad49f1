"""From a composed Hydra config to checked objects. Every check runs here, before any process starts."""

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lightning_smartmoe.callbacks import ExpertPlacementCallback
from lightning_smartmoe.checkpoint import read_meta
from lightning_smartmoe.data import TokenDataModule
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.models import GPTMoEConfig, OptimConfig
from lightning_smartmoe.moe import MoEConfig
from lightning_smartmoe.planner import memory
from lightning_smartmoe.planner.memory import Layout

PACKAGE = Path(__file__).resolve().parent


def _resource_dir(name: str) -> Path:
    """conf/ or recipes/: at the top of a checkout, or inside the installed package."""
    checkout = PACKAGE.parent / name
    return checkout if checkout.is_dir() else PACKAGE / name


def conf_dir() -> Path:
    return _resource_dir("conf")


def register_recipes() -> None:
    """Make each recipes/NAME.yaml selectable as `recipe=NAME` (a global override of the groups)."""
    store = ConfigStore.instance()
    for path in sorted(_resource_dir("recipes").glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def _section(cfg: DictConfig, key: str, cls: type, **extra):
    """cls(**cfg[key], **extra), refusing keys the dataclass does not have."""
    values = OmegaConf.to_container(cfg[key], resolve=True)
    known = set(cls.__dataclass_fields__) - set(extra)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not a known key; allowed: {', '.join(sorted(known))}")
    return cls(**values, **extra)


def model_config(cfg: DictConfig) -> GPTMoEConfig:
    return _section(cfg, "model", GPTMoEConfig, moe=_section(cfg, "moe", MoEConfig))


def optim_config(cfg: DictConfig) -> OptimConfig:
    return _section(cfg, "optim", OptimConfig)


def _check_int(key: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


def check_run(cfg: DictConfig) -> None:
    """Checks of trainer, parallel, placement and resume settings that the dataclasses do not cover."""
    _check_int("trainer.devices", cfg.trainer.devices)  # processes per node; "auto" and lists are not supported
    _check_int("trainer.num_nodes", cfg.trainer.num_nodes)
    _check_int("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches)
    if cfg.parallel.start_method not in ("popen", "spawn"):
        raise ConfigError(f"parallel.start_method={cfg.parallel.start_method!r} is unknown; allowed: popen, spawn")
    if not cfg.parallel.bucket_mb > 0:
        raise ConfigError(f"parallel.bucket_mb={cfg.parallel.bucket_mb} must be > 0")
    _check_int("placement.heatmap_every", cfg.placement.heatmap_every, minimum=0)
    _check_int("placement.extra_slots", cfg.placement.extra_slots, minimum=0)
    if cfg.ckpt_path is not None:
        read_meta(cfg.ckpt_path)


def parallel_sizes(cfg: DictConfig) -> ParallelSizes:
    p = cfg.parallel
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    return ParallelSizes.resolve(world, dp=p.dp, tp=p.tp, pp=p.pp, ep=p.ep, expert_tp=p.expert_tp)


def datamodule(cfg: DictConfig, model: GPTMoEConfig, sizes: ParallelSizes, load: bool = True) -> TokenDataModule:
    """Build the data, sized for the layout, and load it (so a bad path or corpus fails here) unless load=False."""
    d = cfg.data
    dm = TokenDataModule(
        path=d.path,
        seq_len=model.seq_len,
        global_batch_size=d.global_batch_size,
        val_fraction=d.val_fraction,
        vocab_size=model.vocab_size,
        num_workers=d.num_workers,
        seed=d.seed,
    )
    if load:
        dm.prepare(sizes.dp, cfg.trainer.accumulate_grad_batches, cfg.parallel.microbatches)
    else:
        dm.size_batches(sizes.dp, cfg.trainer.accumulate_grad_batches, cfg.parallel.microbatches)
    return dm


def memory_layout(cfg: DictConfig, sizes: ParallelSizes) -> Layout:
    """The run's layout as the memory model takes it."""
    p = cfg.parallel
    return Layout(
        sizes, microbatches=p.microbatches, pp_schedule=p.pp_schedule, virtual_stages=p.virtual_stages,
        sequence_parallel=p.sequence_parallel, extra_slots=cfg.placement.extra_slots, zero=p.zero,
        precision=str(cfg.trainer.precision), accumulate=cfg.trainer.accumulate_grad_batches,
        global_batch=cfg.data.global_batch_size,
    )


def check_memory(cfg: DictConfig, model: GPTMoEConfig, sizes: ParallelSizes) -> None:
    """With `memory_gb` set, refuse a layout whose busiest rank is predicted to need more (planner.memory)."""
    if cfg.memory_gb is None:
        return
    if isinstance(cfg.memory_gb, bool) or not isinstance(cfg.memory_gb, int | float) or cfg.memory_gb <= 0:
        raise ConfigError(f"memory_gb={cfg.memory_gb!r} must be a number > 0 (GiB per rank) or null")
    worst = memory.largest(memory.rank_memory(model, memory_layout(cfg, sizes)))
    if worst.total_bytes > cfg.memory_gb * 2**30:
        terms = {k: v for k, v in worst.as_dict().items() if k.endswith("_bytes") and k != "total_bytes"}
        term = max(terms, key=terms.get)
        raise ConfigError(
            f"memory_gb={cfg.memory_gb}: rank {worst.rank} (pipeline stage {worst.stage}) is predicted to need "
            f"{worst.total_bytes / 2**30:.2f} GiB; its largest term is {term.removesuffix('_bytes')}, "
            f"{terms[term] / 2**30:.2f} GiB (see dry_run=true)"
        )


def placement_callback(cfg: DictConfig) -> ExpertPlacementCallback:
    """The gate-histogram / placement-switching callback from `placement.*`."""
    p = cfg.placement
    return ExpertPlacementCallback(
        policy=p.policy, interval=p.interval, window=p.window, min_gain=p.min_gain,
        heatmap_every=p.heatmap_every, cost=OmegaConf.to_container(p.cost, resolve=True),
    )
