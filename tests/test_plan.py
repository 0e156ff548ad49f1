"""The offline search and smartmoe-plan: workloads, plans the strategy and smartmoe-train accept, memory pruning, a
plan file that trains, and one clear error per bad input."""

import dataclasses
import json
import re

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cli
from lightning_smartmoe import config, train
from lightning_smartmoe import plan as plan_cli
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.models import GPTMoEConfig
from lightning_smartmoe.moe import MoEConfig
from lightning_smartmoe.planner.cost import CostModel
from lightning_smartmoe.planner.hardware import BUILTIN
from lightning_smartmoe.planner.search import layouts, search, workload
from lightning_smartmoe.strategy import SmartMoEStrategy

TINY = ["recipe=gpt_moe_tiny", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1"]
TRACE_COUNTS = np.array([[[[[3, 1, 0, 0]]]], [[[[0, 1, 3, 0]]]], [[[[1, 1, 1, 1]]]]], dtype=np.uint16)  # [3,1,1,1,4]


def tiny_model() -> GPTMoEConfig:
    return GPTMoEConfig(n_layers=4, d_model=64, n_heads=4, seq_len=32, vocab_size=256,
                        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=128))


def run_cli(monkeypatch, capsys, tmp_path, *overrides):
    return cli.run_main(plan_cli.main, "smartmoe-plan", monkeypatch, capsys, tmp_path, *overrides)


# ---------------------------------------------------------------- workloads


def test_workloads_by_hand(tmp_path):
    assert workload("uniform", 4).fractions.tolist() == [[[0.25] * 4]]
    zipf = workload("zipf:1", 3).fractions[0, 0]
    assert zipf == pytest.approx(np.array([1, 1 / 2, 1 / 3]) / (11 / 6))
    path = tmp_path / "t.npz"
    np.savez(path, counts=TRACE_COUNTS, iterations=np.array([1, 11, 21]))
    trace = workload(f"trace:{path}", 4)
    assert trace.fractions[:, 0].tolist() == [[0.75, 0.25, 0, 0], [0, 0.25, 0.75, 0], [0.25] * 4]
    assert trace.steps.tolist() == [10, 10, 10] and trace.scored() == [1, 2]
    assert workload(f"trace:{path}", 2).fractions[0, 0].tolist() == [1.0, 0.0]  # experts merged in pairs
    assert workload(f"trace:{path}", 8).fractions[0, 0].tolist() == [0.375, 0.375, 0.125, 0.125, 0, 0, 0, 0]
    csv = tmp_path / "expert_load.csv"  # as ExpertPlacementCallback writes it
    csv.write_text("step,layer,expert0,expert1\n10,0,3,1\n10,1,2,2\n20,0,0,4\n20,1,1,3\n")
    got = workload(f"csv:{csv}", 2)
    assert got.fractions.tolist() == [[[0.75, 0.25], [0.5, 0.5]], [[0.0, 1.0], [0.25, 0.75]]]
    assert got.steps.tolist() == [10, 10]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gaussian", r"^workload='gaussian' is unknown; allowed: uniform, zipf:S"),
        ("zipf:-1", r"^workload='zipf:-1': zipf needs an exponent S >= 0"),
        ("zipf:x", r"^workload='zipf:x': zipf needs an exponent S >= 0"),
        ("trace:/no/such.npz", r"^workload='trace:/no/such.npz': trace='/no/such.npz': no such file"),
        ("csv:/no/such.csv", r"^workload='csv:/no/such.csv': no such file$"),
        ("csv:BAD", r"^workload='csv:.*': not an expert_load.csv"),
        ("trace:BAD3", r"^workload='trace:.*' has 3 experts; moe.num_experts=4 must divide or be a multiple of it$"),
    ],
)
def test_bad_workloads(tmp_path, spec, message):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("step,layer,expert0\n10,0,-3\n")
    three = tmp_path / "three.npz"
    np.savez(three, counts=np.ones((2, 1, 1, 1, 3), dtype=np.uint16), iterations=np.array([1, 2]))
    spec = spec.replace("csv:BAD", f"csv:{bad_csv}").replace("trace:BAD3", f"trace:{three}")
    with pytest.raises(ConfigError, match=message):
        workload(spec, 4)


# ---------------------------------------------------------------- the search


def test_layouts_are_every_valid_one_and_the_strategy_accepts_each():
    cfg = tiny_model()
    got = list(layouts(cfg, 4, 8, global_batch=16, precision="32-true"))
    shapes = {(x.sizes.dp, x.sizes.tp, x.sizes.pp) for x in got}
    assert shapes == {(4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 4, 1), (1, 2, 2), (1, 1, 4)}
    assert {x.microbatches for x in got if x.sizes.pp == 2} == {1, 2, 4, 8, 16}  # up to the 16 sequences at dp 1
    assert all(x.microbatches >= 2 for x in got if x.pp_schedule == "1f1b" and x.sizes.pp == 2)
    assert {x.sizes.ep for x in got if x.sizes.dp == 4} == {1, 2, 4}
    assert len(got) == len(set(got))
    # ZeRO 0, 1 and 2 wherever something is data-parallel (dense over dp, experts over edp), else 0 only
    zeros = {}
    for x in got:
        zeros.setdefault(dataclasses.replace(x, zero=0), set()).add(x.zero)
    assert all(z == ({0, 1, 2} if x.sizes.dp > 1 or x.sizes.edp > 1 else {0}) for x, z in zeros.items())
    for x in got:
        s = x.sizes
        SmartMoEStrategy(dp=s.dp, tp=s.tp, pp=s.pp, ep=s.ep, expert_tp=s.expert_tp, microbatches=x.microbatches,
                         pp_schedule=x.pp_schedule, virtual_stages=x.virtual_stages,
                         sequence_parallel=x.sequence_parallel, zero=x.zero)
        cfg.check_parallel(s.tp, s.pp, s.expert_tp, x.virtual_stages)
    accumulated = list(layouts(cfg, 4, 1, global_batch=16, precision="32-true", accumulate=16))
    assert accumulated and {(x.sizes.dp, x.sizes.tp, x.microbatches) for x in accumulated} == {(1, 1, 1)}


def test_search_ranks_plans_and_prunes_by_memory():
    cfg = tiny_model()
    model = CostModel(cfg, BUILTIN["h100"])
    found = search(cfg, model, workload("zipf:1.5", 8), 4, 16, "32-true", memory_gb=None)
    times = [p.step_s for p in found["plans"]]
    assert times == sorted(times) and found["refused_for_memory"] == 0
    assert {p.policy for p in found["plans"]} == {"static", "greedy", "balanced"}
    for p in found["plans"][:20]:
        assert p.breakdown.step_s == pytest.approx(p.step_s)
        assert p.memory_bytes == model.memory(p.layout).total_bytes
    mems = sorted(p.memory_bytes for p in found["plans"])
    limit = mems[len(mems) // 2] / 2**30
    pruned = search(cfg, model, workload("zipf:1.5", 8), 4, 16, "32-true", memory_gb=limit)
    assert pruned["refused_for_memory"] > 0
    assert all(p.memory_bytes <= limit * 2**30 for p in pruned["plans"])
    # ZeRO is what lets some layouts fit: among those kept, every one refused without it is kept with it
    kept = {dataclasses.replace(p.layout, zero=0, extra_slots=0) for p in pruned["plans"] if p.layout.zero}
    unsharded = {dataclasses.replace(p.layout, extra_slots=0) for p in pruned["plans"] if not p.layout.zero}
    assert kept - unsharded
    with pytest.raises(ConfigError, match=r"^world=4: no layout to plan: all \d+ layouts need more than memory_gb=1e-06"):
        search(cfg, model, workload("uniform", 8), 4, 16, "32-true", memory_gb=1e-6)
    with pytest.raises(ConfigError, match=r"^world=3: no layout to plan: none of dp x tp x pp = 3 fits the model"):
        search(cfg, model, workload("uniform", 8), 3, 16, "32-true", memory_gb=None)


def test_skew_moves_the_pick_toward_replicas():
    cfg = GPTMoEConfig(n_layers=4, d_model=1024, n_heads=8, seq_len=1024, vocab_size=1024,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=4096))
    model = CostModel(cfg, BUILTIN["h100"])
    policies = [("static", 0), ("balanced", 2)]
    even = search(cfg, model, workload("uniform", 8), 4, 64, "bf16-mixed", None, policies)["plans"]
    skewed = search(cfg, model, workload("zipf:3", 8), 4, 64, "bf16-mixed", None, policies)["plans"]
    best_ep4 = lambda plans, policy: min(p.step_s for p in plans if p.layout.sizes.ep == 4 and p.policy == policy)  # noqa: E731
    assert best_ep4(skewed, "balanced") < best_ep4(skewed, "static")  # replicas pay under skew
    assert best_ep4(even, "static") <= best_ep4(even, "balanced")  # and not without it


def every_plan_config(world: int, extra: list[str]):
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
        config.register_recipes()
        return compose("train", overrides=[*TINY, f"trainer.devices={world}", *extra])


def test_smartmoe_train_accepts_every_plan():
    cfg = every_plan_config(4, [])
    plans = config.search(cfg, config.model_config(cfg), 4)["plans"]
    distinct = {}
    for p in plans:  # the policy does not change what the checks see; each layout once
        distinct.setdefault(tuple(p.overrides()["parallel"].items()) + (p.layout.extra_slots,), p)
    for p in distinct.values():
        config.apply_overrides(cfg, "test", p.overrides())  # every planned key, so nothing of the last plan stays
        _, sizes, strategy, _ = train.check(cfg, load_data=False)
        assert (sizes.dp, sizes.tp, sizes.pp, sizes.ep, sizes.expert_tp) == (
            p.layout.sizes.dp, p.layout.sizes.tp, p.layout.sizes.pp, p.layout.sizes.ep, p.layout.sizes.expert_tp)
        assert strategy.microbatches == p.layout.microbatches


# ---------------------------------------------------------------- the command line


def test_cli_prints_a_ranked_table_and_json_and_writes_the_plan(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, tmp_path, *TINY, "world=4", "workload=zipf:1.2", "top=3",
                             "out=best.yaml")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert len(summary["plans"]) == 3 and summary["search_s"] > 0
    assert [p["step_ms"] for p in summary["plans"]] == sorted(p["step_ms"] for p in summary["plans"])
    keys = {"dp", "tp", "pp", "ep", "expert_tp", "sequence_parallel", "microbatches", "pp_schedule",
            "virtual_stages", "policy", "extra_slots", "step_ms", "memory_mb", "breakdown"}
    assert keys <= set(summary["plans"][0])
    written = yaml.safe_load((tmp_path / "best.yaml").read_text())
    best = summary["plans"][0]
    assert written["parallel"]["tp"] == best["tp"] and written["placement"]["policy"] == best["policy"]
    code, out, _ = run_cli(monkeypatch, capsys, tmp_path, *TINY, "world=4", "top=0", "placement.policy=static")
    every = json.loads(out.strip().splitlines()[-1])["plans"]
    assert code == 0 and len(every) > 3 and {p["policy"] for p in every} == {"static"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], r"world is required"),
        (["world=3"], r"world=3: no layout to plan"),
        (["world=4", "workload=normal"], r"workload='normal' is unknown"),
        (["world=4", "hardware=h900"], r"hardware='h900': no such file"),
        (["world=4", "hardware=BADHW"], r"hardware='.*bad.yaml': field 'collectives' is missing"),
        (["world=4", "hardware=ONEDEV"], r"hardware='.*one.yaml' has no collective fits \(a smartmoe-profile of one "
                                         r"device without collectives_from\): it prices world=1 only, not 4 ranks; "
                                         r"profile on >= 2 devices, or with collectives_from=h100\|h200\|a100\|FILE$"),
        (["world=4", "top=-1"], r"top=-1 must be an integer >= 0"),
        (["world=4", "gpus_per_node=0"], r"gpus_per_node=0 must be an integer >= 1"),
        (["world=4", "memory_gb=0.00001"], r"all \d+ layouts need more than memory_gb=1e-05 GiB"),
    ],
)
def test_cli_bad_input_gives_one_clear_error(monkeypatch, capsys, tmp_path, extra, message):
    bad = tmp_path / "bad.yaml"
    data = {k: v for k, v in vars(BUILTIN["h100"]).items() if k != "collectives"}
    bad.write_text(yaml.safe_dump(data))
    dataclasses.replace(BUILTIN["h100"], collectives={}).to_yaml(tmp_path / "one.yaml")
    extra = [e.replace("BADHW", str(bad)).replace("ONEDEV", str(tmp_path / "one.yaml")) for e in extra]
    code, out, err = run_cli(monkeypatch, capsys, tmp_path, *TINY, *extra)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smartmoe-plan: error: ") and re.search(message, lines[0]), lines


def test_a_profile_of_one_device_plans_one_rank(monkeypatch, capsys, tmp_path):
    """A calibration without collective fits (smartmoe-profile trainer.devices=1) prices world=1."""
    dataclasses.replace(BUILTIN["h100"], collectives={}).to_yaml(tmp_path / "one.yaml")
    code, out, err = run_cli(monkeypatch, capsys, tmp_path, *TINY, "world=1", f"hardware={tmp_path / 'one.yaml'}")
    assert code == 0, err
    plans = json.loads(out.strip().splitlines()[-1])["plans"]
    assert plans and all((p["dp"], p["tp"], p["pp"], p["ep"]) == (1, 1, 1, 1) for p in plans)
    assert all(p["step_ms"] > 0 for p in plans)


# ---------------------------------------------------------------- a plan trains


@pytest.mark.timeout(300)
def test_a_plan_file_trains_three_steps_on_two_ranks(tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({
        "parallel": {"dp": 2, "tp": 1, "pp": 1, "ep": 2, "expert_tp": False, "sequence_parallel": False,
                     "microbatches": 1, "pp_schedule": "1f1b", "virtual_stages": 1, "zero": 0},
        "placement": {"policy": "balanced", "extra_slots": 1},
    }))
    run = cli.run("lightning_smartmoe.train", *TINY, "trainer.devices=2", f"plan={plan_file}", "placement.interval=1",
                  "logger=[csv]", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["layout"] == {"dp": 2, "tp": 1, "pp": 1, "ep": 2, "expert_tp": False}
    assert summary["placement"]["policy"] == "balanced"


def test_plan_and_auto_inputs_are_checked():
    cfg = every_plan_config(2, ["plan=/no/such/plan.yaml"])
    with pytest.raises(ConfigError, match=r"^plan='/no/such/plan.yaml': no such file; write one with smartmoe-plan"):
        train.check(cfg, load_data=False)
    cfg = every_plan_config(2, ["plan=x.yaml", "parallel=auto"])
    with pytest.raises(ConfigError, match=r"and parallel=auto both choose the layout; give one"):
        train.check(cfg, load_data=False)
    cfg = every_plan_config(2, [])
    with pytest.raises(ConfigError, match=r"^test: parallel\.dpp is not a known key; allowed: dp, ep, expert_tp"):
        config.apply_overrides(cfg, "test", {"parallel": {"dpp": 2}, "placement": {}})
    auto = every_plan_config(2, ["parallel=auto", "workload=zipf:2"])
    _, sizes, _, _ = train.check(auto, load_data=False)
    best = config.search(every_plan_config(2, ["workload=zipf:2"]), config.model_config(auto), 2)["plans"][0]
    assert (sizes.dp, sizes.tp, sizes.pp, sizes.ep) == (best.layout.sizes.dp, best.layout.sizes.tp,
                                                        best.layout.sizes.pp, best.layout.sizes.ep)
    assert OmegaConf.select(auto, "placement.policy") == best.policy
