"""smartmoe-plan: SmartMoE's offline stage on the command line (`python -m lightning_smartmoe.plan`).

    smartmoe-plan recipe=smartmoe_gpt_16l_d2560_e32 world=64 hardware=h100 \
        workload=trace:../shared/traces/smartmoe_ae_gpt_top2_e32.npz out=plan.yaml
    smartmoe-train recipe=smartmoe_gpt_16l_d2560_e32 plan=plan.yaml ...

Searches every valid layout of `world` ranks with each placement policy and slot budget (planner/search.py),
priced by the cost model on `hardware` (a built-in datasheet profile or a smartmoe-profile file) over `workload`,
pruned by memory (`memory_gb`, default the hardware's). Prints a ranked table; the last line is one JSON object
{"plans": [...], "search_s", ...}, best first. `out` receives the best plan as YAML. Exit codes: 0; 2 for bad input
(one line on stderr).
"""

import json
import os
import sys
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_smartmoe import config
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.planner.search import POLICIES, Plan

COLUMNS = ("dp", "tp", "pp", "ep", "expert_tp", "sequence_parallel", "microbatches", "pp_schedule", "virtual_stages",
           "policy", "extra_slots", "step_ms", "memory_mb")


def policies(overrides: list[str]) -> list[tuple[str, int]]:
    """The (policy, slots) pairs to search: all of POLICIES, or those matching placement.policy=... and
    placement.extra_slots=... given on the command line."""
    given = dict(o.split("=", 1) for o in overrides if o.startswith(("placement.policy=", "placement.extra_slots=")))
    policy, slots = given.get("placement.policy"), given.get("placement.extra_slots")
    if policy is None and slots is None:
        return list(POLICIES)
    kept = [(p, s) for p, s in POLICIES if policy in (None, p) and slots in (None, str(s))]
    if not kept:  # a combination outside the default pool: search exactly it
        return [(policy or "balanced", int(slots) if slots is not None else 0)]
    return kept


def table(plans: list[Plan]) -> str:
    rows = [[str(p.as_dict()[c]) for c in COLUMNS] for p in plans]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def write(plan: Plan, out: Path, source: str) -> None:
    """The plan's parallel.* and placement.* keys to `out`, whole or not at all (temporary file, then rename)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"# {source}\n# predicted {plan.step_s * 1e3:.3f} ms per step, {plan.memory_bytes / 2**30:.2f} GiB "
                       "on the busiest rank\n" + yaml.safe_dump(plan.overrides(), sort_keys=False))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def run(cfg: DictConfig) -> dict:
    """Check everything, search, print; returns the JSON summary. Raises ConfigError on bad input."""
    if OmegaConf.is_missing(cfg, "world"):
        raise ConfigError("world is required: world=N, the GPUs to plan for")
    config.check_run(cfg, config.PLAN_KEYS, here=False)
    if cfg.gpus_per_node is not None and (isinstance(cfg.gpus_per_node, bool) or not isinstance(cfg.gpus_per_node, int)
                                          or cfg.gpus_per_node < 1):
        raise ConfigError(f"gpus_per_node={cfg.gpus_per_node!r} must be an integer >= 1 or null (the hardware's)")
    if isinstance(cfg.top, bool) or not isinstance(cfg.top, int) or cfg.top < 0:
        raise ConfigError(f"top={cfg.top!r} must be an integer >= 0 (0: every plan)")
    out = None
    if cfg.out is not None:
        out = Path(str(cfg.out)).expanduser().absolute()
        if out.is_dir() or not out.parent.is_dir():
            raise ConfigError(f"out={cfg.out!r} must be a file path in an existing directory")
    model = config.model_config(cfg)
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    found = config.search(cfg, model, cfg.world, cfg.gpus_per_node, policies(list(overrides)))
    plans = found["plans"] if cfg.top == 0 else found["plans"][: cfg.top]
    print(f"{len(found['plans'])} plans of {found['layouts']} layouts ({found['refused_for_memory']} refused for "
          f"memory) for world={cfg.world} on {cfg.hardware}, workload {cfg.workload}, in {found['search_s']:.1f} s")
    print(table(plans))
    if out is not None:
        write(found["plans"][0], out, "smartmoe-plan " + " ".join(overrides))
        print(f"wrote {out}")
    return {"plans": [p.as_dict() for p in plans], "search_s": round(found["search_s"], 3), "world": cfg.world,
            "hardware": str(cfg.hardware), "workload": str(cfg.workload), "layouts": found["layouts"],
            "refused_for_memory": found["refused_for_memory"]}


def main() -> None:
    config.register_recipes()

    @hydra.main(config_path=str(config.conf_dir()), config_name="plan", version_base="1.3")
    def entry(cfg: DictConfig) -> None:
        try:
            summary = run(cfg)
        except ConfigError as err:
            print(f"smartmoe-plan: error: {err}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps(summary, allow_nan=False))

    entry()


if __name__ == "__main__":
    main()
