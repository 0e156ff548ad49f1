"""From a composed Hydra config to checked objects. Every check runs here, before any process starts: unknown keys
in any group are refused with the allowed ones, and every value is type- and range-checked."""

import dataclasses
import inspect
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
import yaml

from lightning_smartmoe.callbacks import ExpertPlacementCallback
from lightning_smartmoe.checkpoint import newest
from lightning_smartmoe.data import TokenDataModule
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.interop import hf_model_config
from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.models import MODELS, ModelConfig, OptimConfig
from lightning_smartmoe.moe import MoEConfig
from lightning_smartmoe.placement import PLANNERS
from lightning_smartmoe.planner import hardware as hardware_profiles
from lightning_smartmoe.planner import memory
from lightning_smartmoe.planner import search as planner_search
from lightning_smartmoe.planner.cost import CostModel
from lightning_smartmoe.planner.memory import Layout
from lightning_smartmoe.planner.profile import CollectivesFrom, ProfileSettings, measured_scopes

PACKAGE = Path(__file__).resolve().parent
GROUPS = ("model", "moe", "parallel", "placement", "data", "optim", "trainer", "logger", "callbacks")
TOP_LEVEL = ("seed", "ckpt_path", "checkpoint_every_n_steps", "dry_run", "memory_gb", "hardware", "plan", "workload")
PROFILE_KEYS = ("out", "repeats", "payload_bytes", "collectives_from")  # smartmoe-profile's (conf/profile.yaml)
PLAN_KEYS = ("world", "gpus_per_node", "top", "out")  # smartmoe-plan's (conf/plan.yaml)
PLANNED = {"parallel": ("dp", "tp", "pp", "ep", "expert_tp", "sequence_parallel", "microbatches", "pp_schedule",
                        "virtual_stages", "zero"),
           "placement": ("policy", "extra_slots")}  # the keys a plan file sets
SET_BY_CLI = ("strategy", "logger", "callbacks")  # Trainer arguments that smartmoe-train fills in itself


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


# ---- value checks ------------------------------------------------------------------------------------------------


def _type_name(t: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(t, str(t))


def _is(value: Any, t: Any) -> bool:
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, t)


def _check_type(key: str, value: Any, hint: Any) -> None:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    if not any(_is(value, t) for t in allowed):
        raise ConfigError(f"{key}={value!r} must be {' or '.join(_type_name(t) for t in allowed)}")


def _integer(key: str, value: Any, minimum: int, none_ok: bool = False) -> None:
    if none_ok and value is None:
        return
    if not _is(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}" + (" or null" if none_ok else ""))


def _number(key: str, value: Any, ok: Callable[[float], bool], rule: str, none_ok: bool = False) -> None:
    if none_ok and value is None:
        return
    if not _is(value, float) or math.isnan(value) or not ok(value):
        raise ConfigError(f"{key}={value!r} must be a number {rule}" + (" or null" if none_ok else ""))


def _boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")


def _choice(key: str, value: Any, allowed: typing.Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is unknown; allowed: {', '.join(str(a) for a in allowed)}")


def _positive(x: float) -> bool:
    return 0 < x < math.inf


# ---- keys ----------------------------------------------------------------------------------------------------------


def _unknown(prefix: str, keys: typing.Iterable[str], allowed: typing.Iterable[str]) -> None:
    allowed = sorted(allowed)
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise ConfigError(f"{prefix}{extra[0]} is not a known key; allowed: {', '.join(allowed)}")


def _default_keys(group: str) -> list[str]:
    return list(OmegaConf.load(conf_dir() / group / "default.yaml"))


def trainer_arguments() -> list[str]:
    """Lightning Trainer arguments that `trainer.*` may set (its signature, less those smartmoe-train sets)."""
    names = inspect.signature(pl.Trainer.__init__).parameters
    return [n for n in names if n not in ("self", *SET_BY_CLI)]


def _check_keys(cfg: DictConfig, tool_keys: typing.Iterable[str]) -> None:
    _unknown("", cfg.keys(), (*GROUPS, *TOP_LEVEL, *tool_keys))
    for group in ("parallel", "placement", "data"):
        _unknown(f"{group}.", cfg[group].keys(), _default_keys(group))
    for key in cfg.trainer:
        if key in SET_BY_CLI:
            raise ConfigError(f"trainer.{key} is set by smartmoe-train (from parallel.*, logger and callbacks); remove it")
    _unknown("trainer.", cfg.trainer.keys(), trainer_arguments())


def _section(cfg: DictConfig, key: str, cls: type, skip: tuple[str, ...] = (), **extra):
    """cls(**cfg[key] less the keys `skip`, **extra), refusing keys the dataclass does not have and values of the
    wrong type."""
    values = {k: v for k, v in OmegaConf.to_container(cfg[key], resolve=True).items() if k not in skip}
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.name not in extra]
    _unknown(f"{key}.", values, known)
    for name, value in values.items():
        _check_type(f"{key}.{name}", value, hints[name])
    return cls(**values, **extra)


def model_config(cfg: DictConfig) -> ModelConfig:
    """The model of `model.arch` (gpt_moe | llama_moe) from `model.*` and `moe.*`.

    With `model.init_from=hf:DIR` the architecture comes from DIR's config.json, and every rank later reads its
    share of DIR's weights; the tensors are checked here (headers only)."""
    arch = cfg.model.get("arch", "gpt_moe")
    _choice("model.arch", arch, list(MODELS))
    model = _section(cfg, "model", MODELS[arch], skip=("arch",), moe=_section(cfg, "moe", MoEConfig))
    if getattr(model, "init_from", None) is None:
        return model
    model = hf_model_config(model.init_from.removeprefix("hf:"), model)
    with torch.device("meta"):
        model.build()  # checks the checkpoint's tensors against the model
    return model


def optim_config(cfg: DictConfig) -> OptimConfig:
    return _section(cfg, "optim", OptimConfig)


# ---- run settings --------------------------------------------------------------------------------------------------


def precisions() -> list[Any]:
    """Every value Lightning accepts for trainer.precision."""
    return [value for literal in typing.get_args(_PRECISION_INPUT) for value in typing.get_args(literal)]


def accelerators_here(anywhere: bool = False) -> list[str]:
    """trainer.accelerator values that can run on this machine (anywhere=True: on any machine)."""
    names = [n for n in sorted(AcceleratorRegistry.available_accelerators())
             if anywhere or AcceleratorRegistry[n]["accelerator"].is_available()]
    return ["auto", *names, *(["gpu"] if anywhere or {"cuda", "mps"} & set(names) else [])]


def _check_trainer(t: DictConfig, here: bool = True) -> None:
    """`here`: the run starts on this machine (a dry run only predicts, so any accelerator Lightning knows will do)."""
    _integer("trainer.devices", t.devices, 1)  # processes per node; "auto" and lists are not supported
    _integer("trainer.num_nodes", t.num_nodes, 1)
    _integer("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1)
    _choice("trainer.precision", t.precision, precisions())
    if not here:
        _choice("trainer.accelerator", t.accelerator, accelerators_here(anywhere=True))
    elif t.accelerator not in accelerators_here():
        raise ConfigError(
            f"trainer.accelerator={t.accelerator!r} cannot run here; allowed on this machine: {', '.join(accelerators_here())}"
        )
    _integer("trainer.max_steps", t.max_steps, -1)
    _integer("trainer.max_epochs", t.max_epochs, -1, none_ok=True)
    if t.max_steps == -1 and t.max_epochs in (-1, None):
        raise ConfigError(
            "trainer.max_steps=-1 (no step limit) needs trainer.max_epochs >= 1: the learning-rate schedule spans the run"
        )
    if t.val_check_interval is not None and not (_is(t.val_check_interval, int) and t.val_check_interval >= 1):
        _number("trainer.val_check_interval", t.val_check_interval, lambda x: 0 < x <= 1, "in (0, 1] or an integer >= 1")
    _integer("trainer.check_val_every_n_epoch", t.check_val_every_n_epoch, 1, none_ok=True)
    if not (_is(t.limit_val_batches, int) and t.limit_val_batches >= 0):
        _number("trainer.limit_val_batches", t.limit_val_batches, lambda x: 0 <= x <= 1, "in [0, 1] or an integer >= 0")
    _integer("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    _number("trainer.gradient_clip_val", t.gradient_clip_val, lambda x: 0 <= x < math.inf, ">= 0", none_ok=True)
    _boolean("trainer.enable_progress_bar", t.enable_progress_bar)


def _check_parallel(p: DictConfig) -> None:
    _integer("parallel.dp", p.dp, 1, none_ok=True)
    for key in ("tp", "pp", "ep", "microbatches", "virtual_stages"):
        _integer(f"parallel.{key}", p[key], 1)
    _boolean("parallel.sequence_parallel", p.sequence_parallel)
    _boolean("parallel.expert_tp", p.expert_tp)
    _boolean("parallel.auto", p.auto)
    _choice("parallel.start_method", p.start_method, ("popen", "spawn"))
    _number("parallel.bucket_mb", p.bucket_mb, _positive, "> 0")
    _number("parallel.timeout_s", p.timeout_s, _positive, "> 0 (seconds)")


def _check_placement(p: DictConfig) -> None:
    _choice("placement.policy", p.policy, tuple(PLANNERS))
    if p.interval != "epoch" and not (_is(p.interval, int) and p.interval >= 1):
        raise ConfigError(f"placement.interval={p.interval!r} must be an integer >= 1 or 'epoch'")
    _integer("placement.window", p.window, 1)
    _number("placement.min_gain", p.min_gain, lambda x: True, "of seconds (-inf: always switch)")
    _integer("placement.extra_slots", p.extra_slots, 0)
    _integer("placement.heatmap_every", p.heatmap_every, 0)
    _boolean("placement.calibrate", p.calibrate)


def _check_data(d: DictConfig) -> None:
    if d.path is not None and not isinstance(d.path, str):
        raise ConfigError(f"data.path={d.path!r} must be a path or null")
    _number("data.val_fraction", d.val_fraction, lambda x: 0 < x < 1, "in (0, 1)")
    _integer("data.global_batch_size", d.global_batch_size, 1)
    _integer("data.num_workers", d.num_workers, 0)
    _integer("data.seed", d.seed, 0)


def check_run(cfg: DictConfig, tool_keys: typing.Iterable[str] = (), here: bool | None = None) -> None:
    """Every key known (those of smartmoe-train, and a tool's own top-level `tool_keys`) and every value of the run
    settings in range (the model, moe and optim dataclasses check their own when built). `here`: the run is to
    start on this machine (default: unless dry_run), so its accelerator must exist."""
    _check_keys(cfg, tool_keys)
    _boolean("dry_run", cfg.dry_run)
    _check_trainer(cfg.trainer, here=not cfg.dry_run if here is None else here)
    _check_parallel(cfg.parallel)
    _check_placement(cfg.placement)
    _check_data(cfg.data)
    _integer("seed", cfg.seed, 0)
    _integer("checkpoint_every_n_steps", cfg.checkpoint_every_n_steps, 1, none_ok=True)
    _number("memory_gb", cfg.memory_gb, _positive, "> 0 (GiB per rank)", none_ok=True)
    hardware(cfg)
    if cfg.ckpt_path is not None and not isinstance(cfg.ckpt_path, str):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} must be a checkpoint folder, 'last' or null")
    if cfg.plan is not None and not isinstance(cfg.plan, str):
        raise ConfigError(f"plan={cfg.plan!r} must be the path of a plan written by smartmoe-plan, or null")
    if cfg.plan is not None and cfg.parallel.auto:
        raise ConfigError(f"plan={cfg.plan!r} and parallel=auto both choose the layout; give one")


def search(cfg: DictConfig, model: ModelConfig, world: int, gpus_per_node: int | None = None,
           policies: typing.Sequence[tuple[str, int]] = planner_search.POLICIES) -> dict:
    """planner.search over `world` ranks for this run's model, batch, precision, `hardware` (its GPUs per node
    replaced by `gpus_per_node`), `workload` and `memory_gb` (default: the hardware's). ConfigError if `world`
    has more than one rank and the hardware no collective fits."""
    hw = hardware(cfg)
    if _is(world, int) and world > 1 and not hw.collectives:
        raise ConfigError(f"hardware={cfg.hardware!r} has no collective fits (a smartmoe-profile of one device without "
                          f"collectives_from): it prices world=1 only, not {world} ranks; profile on >= 2 devices, or "
                          f"with collectives_from={'|'.join(hardware_profiles.BUILTIN)}|FILE")
    if gpus_per_node is not None:
        hw = dataclasses.replace(hw, gpus_per_node=gpus_per_node)
    load = planner_search.workload(cfg.workload, model.moe.num_experts)
    memory_gb = cfg.memory_gb if cfg.memory_gb is not None else hw.memory_gb
    return planner_search.search(model, CostModel(model, hw), load, world, cfg.data.global_batch_size,
                                 str(cfg.trainer.precision), memory_gb, policies, cfg.trainer.accumulate_grad_batches)


def apply_overrides(cfg: DictConfig, where: str, data: object) -> None:
    """Set a plan's parallel.* and placement.* keys (`data`, from `where`) in `cfg`, checked."""
    if not isinstance(data, dict) or set(data) != set(PLANNED):
        raise ConfigError(f"{where}: a plan maps exactly {' and '.join(PLANNED)} to their keys")
    for group, keys in PLANNED.items():
        if not isinstance(data[group], dict):
            raise ConfigError(f"{where}: {group} must map keys to values")
        _unknown(f"{where}: {group}.", data[group].keys(), keys)
        for key, value in data[group].items():
            OmegaConf.update(cfg, f"{group}.{key}", value)
    _check_parallel(cfg.parallel)
    _check_placement(cfg.placement)


def choose_layout(cfg: DictConfig, model: ModelConfig) -> None:
    """`plan=PATH` or `parallel=auto`: set the layout and placement keys in `cfg` from the plan file or from the
    best plan of a search over this run's world (before any process starts)."""
    if cfg.plan is not None:
        apply_plan(cfg, cfg.plan)
    elif cfg.parallel.auto:
        best = search(cfg, model, cfg.trainer.devices * cfg.trainer.num_nodes)["plans"][0]
        apply_overrides(cfg, "parallel=auto", best.overrides())


def apply_plan(cfg: DictConfig, path: str) -> None:
    """Set the parallel.* and placement.* keys of a plan file (written by smartmoe-plan) in `cfg`, checked."""
    where = f"plan={path!r}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; write one with smartmoe-plan out=PATH") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{where}: not a readable YAML plan: {err}") from None
    apply_overrides(cfg, where, data)


def parallel_sizes(cfg: DictConfig) -> ParallelSizes:
    p = cfg.parallel
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    return ParallelSizes.resolve(world, dp=p.dp, tp=p.tp, pp=p.pp, ep=p.ep, expert_tp=p.expert_tp)


def checkpoint_to_resume(cfg: DictConfig, checkpoints: Path) -> Path | None:
    """`ckpt_path` as a path; `last` is the newest complete checkpoint in the run's folder `checkpoints`, or None
    (start fresh) when it has none."""
    if cfg.ckpt_path is None:
        return None
    return newest(checkpoints) if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)


def datamodule(cfg: DictConfig, model: ModelConfig, sizes: ParallelSizes, load: bool = True) -> TokenDataModule:
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


def check_memory(cfg: DictConfig, model: ModelConfig, sizes: ParallelSizes) -> None:
    """With `memory_gb` set, refuse a layout whose busiest rank is predicted to need more (planner.memory)."""
    if cfg.memory_gb is None:
        return
    worst = memory.largest(memory.rank_memory(model, memory_layout(cfg, sizes)))
    if worst.total_bytes > cfg.memory_gb * 2**30:
        terms = {k: v for k, v in worst.as_dict().items() if k.endswith("_bytes") and k != "total_bytes"}
        term = max(terms, key=terms.get)
        raise ConfigError(
            f"memory_gb={cfg.memory_gb}: rank {worst.rank} (pipeline stage {worst.stage}) is predicted to need "
            f"{worst.total_bytes / 2**30:.2f} GiB; its largest term is {term.removesuffix('_bytes')}, "
            f"{terms[term] / 2**30:.2f} GiB (see dry_run=true)"
        )


def hardware(cfg: DictConfig) -> hardware_profiles.Hardware:
    """`hardware`: a built-in datasheet profile or a smartmoe-profile calibration file (ConfigError otherwise)."""
    if not isinstance(cfg.hardware, str):
        raise ConfigError(f"hardware={cfg.hardware!r} must be {', '.join(hardware_profiles.BUILTIN)} or a calibration file")
    return hardware_profiles.resolve(cfg.hardware)


def placement_callback(cfg: DictConfig, image_dir: Path | None = None) -> ExpertPlacementCallback:
    """The gate-histogram / placement-switching callback from `placement.*`."""
    p = cfg.placement
    return ExpertPlacementCallback(
        policy=p.policy, interval=p.interval, window=p.window, min_gain=p.min_gain,
        heatmap_every=p.heatmap_every, hardware=hardware(cfg), calibrate=p.calibrate,
        image_dir=image_dir,
    )


def _instantiate_group(cfg: DictConfig, group: str, base: type) -> list[Any]:
    """Each entry NAME of `group` (a mapping with `_target_`, or null to leave it out), instantiated; it must be
    a `base`."""
    node = cfg.get(group)
    out = []
    for name, entry in (node or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigError(f"{group}.{name} needs a _target_ (the class to build), e.g. +{group}.{name}._target_=...")
        try:
            obj = instantiate(entry)
        except Exception as err:
            cause = err.__cause__ or err
            raise ConfigError(f"{group}.{name}: {entry._target_} could not be built: {str(cause).splitlines()[0]}") from err
        if not isinstance(obj, base):
            raise ConfigError(f"{group}.{name}: {entry._target_} is not a {base.__module__}.{base.__qualname__}")
        out.append(obj)
    return out


def loggers(cfg: DictConfig) -> list[Logger]:
    """The `logger` group: every entry instantiated from its `_target_` (a Lightning logger each)."""
    return _instantiate_group(cfg, "logger", Logger)


def callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The `callbacks` group: every entry instantiated from its `_target_` (a Lightning callback each)."""
    return _instantiate_group(cfg, "callbacks", pl.Callback)


def profile_settings(cfg: DictConfig) -> tuple[Path, ProfileSettings, CollectivesFrom | None]:
    """smartmoe-profile's own keys, checked (the file to write: its folder exists and is writable; what to
    measure; where the collectives it does not measure come from), and a precision it knows. Returns the file's
    absolute path, the settings and `collectives_from`."""
    if OmegaConf.is_missing(cfg, "out"):
        raise ConfigError("out is required: out=PATH, the calibration YAML to write")
    if not isinstance(cfg.out, str) or not cfg.out:
        raise ConfigError(f"out={cfg.out!r} must be the path of the YAML file to write")
    out = Path(cfg.out).expanduser().absolute()
    if out.is_dir():
        raise ConfigError(f"out={cfg.out!r} is a directory; give the path of the YAML file to write")
    if not out.parent.is_dir():
        raise ConfigError(f"out={cfg.out!r}: there is no directory {out.parent}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"out={cfg.out!r}: directory {out.parent} is not writable")
    _integer("repeats", cfg.repeats, 1)
    payloads = cfg.payload_bytes
    if (not OmegaConf.is_list(payloads) or not all(_is(b, int) and b >= 1 for b in payloads)
            or len(set(payloads)) < 2):
        shown = OmegaConf.to_container(payloads) if OmegaConf.is_list(payloads) else payloads
        raise ConfigError(f"payload_bytes={shown!r} must be a list of at least 2 different integers >= 1 (bytes "
                          "per rank of each collective call)")
    if str(cfg.trainer.precision) not in memory.PARAM_DTYPES:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}: smartmoe-profile measures at "
                          f"{', '.join(memory.PARAM_DTYPES)}")
    return out, ProfileSettings(cfg.repeats, tuple(sorted(set(payloads)))), collectives_from(cfg)


def collectives_from(cfg: DictConfig) -> CollectivesFrom | None:
    """smartmoe-profile's `collectives_from`, checked: null, or a built-in profile or calibration file that has fits
    of a scope this run does not measure (intra: trainer.devices = 1; inter: trainer.num_nodes = 1)."""
    name = cfg.collectives_from
    if name is None:
        return None
    builtin = ", ".join(hardware_profiles.BUILTIN)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"collectives_from={name!r} must be null, {builtin} or a smartmoe-profile calibration file")
    lender = hardware_profiles.resolve(name, key="collectives_from")
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    unmeasured = [s for s in hardware_profiles.SCOPES if s not in measured_scopes(devices, nodes)]
    if not unmeasured:
        raise ConfigError(f"collectives_from={name!r}: trainer.devices={devices} x trainer.num_nodes={nodes} "
                          "measures every collective (intra and inter); leave collectives_from null")
    if not set(unmeasured) & set(lender.scopes):
        raise ConfigError(f"collectives_from={name!r} has no {' or '.join(unmeasured)} fits, which this run does "
                          f"not measure; give {builtin} or a calibration file that has them")
    return CollectivesFrom(name, lender)
