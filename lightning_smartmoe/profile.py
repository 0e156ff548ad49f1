"""smartmoe-profile: measure this machine at a model's shapes and write the planner's calibration file
(`python -m lightning_smartmoe.profile`).

    smartmoe-profile recipe=gpt_moe_tiny trainer.devices=4 out=cpu4.yaml
    smartmoe-profile recipe=gpt_moe_tiny trainer.devices=1 collectives_from=h100 out=one.yaml

smartmoe-train's groups and recipes choose the model, the layout whose shapes one rank computes, the devices and
the precision; the processes start as smartmoe-train's do (one per device: its own launcher, torchrun, SLURM or
spawn); one device runs in this process, with no process group, and measures no collective (`collectives_from`
gives them: conf/profile.yaml). What is measured and how: planner/profile.py; the file: planner/hardware.py,
written by rank 0 (to a temporary file, then renamed). Exit codes: 0 when the file is written; 2 for bad input
(one line on stderr, before any process starts).
"""

import functools
import hashlib
import os
import socket
import sys
import time
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from lightning_smartmoe import config, train
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.planner.hardware import Hardware
from lightning_smartmoe.planner.profile import (CollectivesFrom, ModelShapes, ProfileSettings, expert_fit_errors,
                                               group_slowdown, profile, with_collectives_from)
from lightning_smartmoe.strategy import SmartMoEStrategy


def write(hw: Hardware, out: Path) -> None:
    """`hw` to `out` as YAML, whole or not at all: written to a temporary file beside it, flushed to disk, then
    renamed."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        hw.to_yaml(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def summary(hw: Hardware, written: Hardware, shapes: ModelShapes, times: dict[str, float], seconds: float) -> str:
    """The measured figures `hw` in a few lines, for people (`times`: the compute timings they were fitted to), and
    the node and the source of the file `written` (with collectives_from's fits)."""
    errors = [abs(e) for e in expert_fit_errors(hw, shapes, times)]
    slowdown = ", ".join(f"{rows} rows {group_slowdown(hw, rows, shapes.expert_flops_per_row):.2f}x"
                         for rows in sorted({r for _, r in shapes.expert_cases}))
    lines = [
        f"{hw.name}, {hw.gpus_per_node} processes per node, measured in {seconds:.1f} s",
        f"  dense GEMM {hw.gemm_flops / 1e9:.2f} GFLOP/s, attention {hw.attention_flops / 1e9:.2f} GFLOP/s, "
        f"optimizer step {hw.optimizer_s_per_param * 1e9:.2f} ns per parameter, memory {hw.memory_gb:.1f} GiB per "
        f"rank; a rank computes {hw.sharing:.2f}x slower with every rank of its node busy than alone (sharing)",
        f"  unpriced work per layer {hw.layer_s * 1e3:.2f} ms + {hw.layer_token_s * 1e6:.2f} us per token, at the "
        f"ends {hw.ends_s * 1e3:.2f} ms + {hw.ends_token_s * 1e6:.2f} us per token (per micro-batch)",
        f"  expert FFN {hw.expert_flops / 1e9:.2f} GFLOP/s + {hw.expert_group_s * 1e6:.1f} us per group; time per "
        f"row over a large group's: {slowdown}",
        f"  expert fit within {100 * sum(errors) / len(errors):.0f}% on average, {100 * max(errors):.0f}% at most, of "
        f"the {len(errors)} measured cases (1 to {max(g for g, _ in shapes.expert_cases)} groups)",
    ]
    if hw.dispatch_s:
        lines.append("  dispatch work beyond the all-to-all fits, per MoE layer and micro-batch: " + ", ".join(
            f"ep={n} {t * 1e3:.2f} ms" for n, t in sorted(hw.dispatch_s.items())))
    if hw.sync_s:
        lines.append(f"  a collective reached from compute waits for the ranks sharing the cores up to "
                     f"{hw.sync_s * 1e3:.2f} ms, half of that after {hw.sync_work_s * 1e3:.2f} ms of compute")
    for op, scopes in hw.collectives.items():
        for scope, fits in scopes.items():
            lines.append(f"  {op:<14} {scope}: " + ", ".join(
                f"n={n} {link.latency_s * 1e6:.0f} us + {link.bytes_per_s / 1e9:.2f} GB/s" for n, link in fits.items()))
    lines.append(f"  written: gpus_per_node {written.gpus_per_node}, source: {written.source}")
    return "\n".join(lines)


def measure_on_rank(strategy: SmartMoEStrategy, shapes: ModelShapes, settings: ProfileSettings,
                    collectives_from: CollectivesFrom | None, out: Path, source: str) -> None:
    """On every rank: join the process group (none for one process), measure (planner.profile.profile), add the
    fits of the scopes not measured from `collectives_from`, and on rank 0 write `out`. Every rank prints a digest
    of the figures it holds, which is the same on all."""
    strategy.setup_environment()
    start = time.perf_counter()  # once every rank has joined
    try:
        measured, times = profile(shapes, settings, strategy.root_device, strategy.num_processes, source)
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    hw = with_collectives_from(measured, collectives_from)
    if strategy.global_rank == 0:
        write(hw, out)
        print(summary(measured, hw, shapes, times, time.perf_counter() - start))
        print(f"wrote {out}")
    digest = hashlib.sha256(repr(hw).encode()).hexdigest()[:16]
    print(f"smartmoe-profile: rank {strategy.global_rank} of {strategy.world_size} holds figures {digest}", flush=True)


def run(cfg: DictConfig) -> None:
    """Check everything, start the processes and measure; exit code 2 with one line on bad input."""
    try:
        model_cfg, sizes, strategy, _ = train.check(cfg, load_data=False, tool_keys=config.PROFILE_KEYS)
        out, settings, collectives_from = config.profile_settings(cfg)
        shapes = ModelShapes.of(model_cfg, config.memory_layout(cfg, sizes), config.optim_config(cfg),
                                clip=bool(cfg.trainer.gradient_clip_val))
        strategy = train.make_trainer(cfg, strategy, logger=False).strategy
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        command = " ".join(["smartmoe-profile", *HydraConfig.get().overrides.task])
        source = f"measured on {socket.gethostname()} {when} by {command}"
        measure = functools.partial(measure_on_rank, strategy, shapes, settings, collectives_from, out,
                                    source)  # spawn: passed whole
        if strategy.launcher is not None:
            strategy.launcher.launch(measure)
        else:
            measure()
    except ConfigError as err:
        if rank_zero_only.rank == 0:
            print(f"smartmoe-profile: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    config.register_recipes()
    hydra.main(config_path=str(config.conf_dir()), config_name="profile", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
