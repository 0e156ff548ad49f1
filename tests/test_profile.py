"""smartmoe-profile measures on real gloo processes and writes a calibration that planner.hardware loads; bad
input ends it with one line and exit code 2 before any process starts."""

import math
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import cli
from distributed import run_distributed
from lightning_smartmoe import config, profile
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.layout import ParallelSizes
from lightning_smartmoe.models import GPTMoEConfig, OptimConfig
from lightning_smartmoe.moe import MoEConfig
from lightning_smartmoe.planner import hardware
from lightning_smartmoe.planner import profile as planner_profile
from lightning_smartmoe.planner.memory import Layout
from lightning_smartmoe.planner.profile import (CollectivesFrom, ModelShapes, ProfileSettings, collective_fits,
                                               collective_groups, fit_dispatch, fit_overheads, fit_sync,
                                               measure_sharing, nonnegative_least_squares, own_groups, sync_times,
                                               unpriced_seconds, with_collectives_from)

config.register_recipes()

TINY = ("recipe=gpt_moe_tiny", "model.n_layers=2", "model.d_model=64", "model.seq_len=32", "data.global_batch_size=4")


@pytest.mark.timeout(90)
def test_two_processes_write_a_calibration_that_loads(tmp_path):
    out = tmp_path / "cpu2.yaml"
    run = cli.run("lightning_smartmoe.profile", *TINY, "trainer.devices=2", "parallel.ep=2", "repeats=2",
                  "payload_bytes=[4096,65536,1048576]", f"out={out}", cwd=tmp_path, timeout=80)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu2.yaml"]  # no temporary file left, no run folder
    hw = hardware.load(out)
    rates = (hw.memory_gb, hw.gemm_flops, hw.expert_flops, hw.attention_flops, hw.optimizer_s_per_param)
    assert all(math.isfinite(x) and x > 0 for x in rates), hw
    assert hw.expert_group_s > 0  # small groups run slower per row (measured here: 1.7x at 64 rows, 3.7x at 16)
    overheads = (hw.layer_s, hw.layer_token_s, hw.ends_s, hw.ends_token_s)
    # 0 where the rates already price the tiny model's whole step (fit_overheads is checked on known times below)
    assert all(math.isfinite(x) and x >= 0 for x in overheads), hw
    assert sorted(hw.collectives) == sorted(hardware.OPS)
    for op, scopes in hw.collectives.items():
        assert list(scopes) == ["intra"] and list(scopes["intra"]) == [2], op
        link = scopes["intra"][2]
        assert math.isfinite(link.latency_s) and link.latency_s >= 0 and math.isfinite(link.bytes_per_s), op
    assert list(hw.dispatch_s) == [2] and math.isfinite(hw.dispatch_s[2]) and hw.dispatch_s[2] >= 0, hw.dispatch_s
    assert hw.gpus_per_node == 2 and hw.source.startswith("measured on ") and "trainer.devices=2" in hw.source
    if len(os.sched_getaffinity(0)) >= 2:  # a core each: nothing shared, nothing measured
        assert hw.sharing == 1.0 and hw.sync_s == hw.sync_work_s == 0.0
    digests = re.findall(r"rank (\d) of 2 holds figures (\w+)", run.stdout)
    assert sorted(r for r, _ in digests) == ["0", "1"] and len({d for _, d in digests}) == 1, run.stdout
    assert "expert FFN" in run.stdout and f"wrote {out}" in run.stdout


@pytest.mark.timeout(90)
@pytest.mark.parametrize("collectives_from", [None, "h100"])
def test_one_process_writes_a_calibration_that_loads(tmp_path, collectives_from):
    """trainer.devices=1 measures every compute figure in the launching process (no process group, no other
    process); the collectives are none, or collectives_from's, labelled as such."""
    out = tmp_path / "one.yaml"
    lend = [f"collectives_from={collectives_from}"] if collectives_from else []
    run = cli.run("lightning_smartmoe.profile", *TINY, "trainer.devices=1", "repeats=3", *lend, f"out={out}",
                  cwd=tmp_path, timeout=80, env={"OMP_NUM_THREADS": "1"})  # torch's 2 threads stall on a busy 2-core box
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.yaml"] and "rank 0 of 1 holds figures" in run.stdout
    hw = hardware.load(out)
    rates = (hw.memory_gb, hw.gemm_flops, hw.expert_flops, hw.attention_flops, hw.optimizer_s_per_param)
    assert all(math.isfinite(x) and x > 0 for x in rates), hw
    assert hw.source.startswith("measured on ") and "trainer.devices=1" in hw.source
    assert hw.dispatch_s == {} and hw.sync_s == 0.0  # no group to dispatch over or wait in
    if collectives_from is None:
        assert hw.collectives == {} and hw.gpus_per_node == 1
        assert hw.source.endswith("; collectives: none (one device, no collectives_from)"), hw.source
        with pytest.raises(ConfigError, match=r"^hardware 'cpu .*' \(measured on .*\) has no fit of p2p on 2 ranks: it "
                                              r"was profiled on one device; profile on >= 2 devices"):
            hw.link("p2p", 2, inter=True)
        assert hw.link("p2p", 1) == hardware.Link(0.0, math.inf)
    else:
        assert hw.collectives == hardware.BUILTIN["h100"].collectives and hw.gpus_per_node == 8
        assert hw.source.endswith("; collectives: intra and inter from collectives_from=h100 (datasheet peaks of the "
                                  "H100 (not measured); collectives by ring algebra)"), hw.source


@pytest.mark.timeout(150)
def test_bad_input_on_the_command_line_starts_no_process(tmp_path):
    run = cli.run("lightning_smartmoe.profile", "trainer.devices=2", cwd=tmp_path, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == ["smartmoe-profile: error: out is required: out=PATH, the calibration YAML to write"], lines
    assert run.children_seen == set() and list(tmp_path.iterdir()) == []


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process may not create files in: read-only for a user; immutable (chattr +i) for root,
    whom permissions do not stop."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root, and chattr +i is not available here")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+outt=x.yaml", "out=x.yaml"], r"outt is not a known key; allowed: .*\bcollectives_from\b.*\bout\b"),
        (["+parallel.dpp=2", "out=x.yaml"], r"parallel\.dpp is not a known key"),
        (["out=x.yaml", "repeats=0"], r"repeats=0 must be an integer >= 1"),
        (["out=x.yaml", "payload_bytes=[1024,1024]"], r"payload_bytes=\[1024, 1024\] must be a list of at least 2 "),
        (["out=x.yaml", "trainer.precision=16-mixed"], r"trainer\.precision='16-mixed': smartmoe-profile measures at "),
        (["out={tmp}"], r"out='.*' is a directory; give the path of the YAML file to write"),
        (["out={tmp}/no/such/x.yaml"], r"out='.*/no/such/x\.yaml': there is no directory .*/no/such$"),
        (["out=x.yaml", "collectives_from=h900"], r"collectives_from='h900': no such file; give a built-in name "
                                                  r"\(h100, h200, a100\) or a smartmoe-profile file$"),
        (["out=x.yaml", "collectives_from={tmp}/no.yaml"], r"collectives_from='.*/no\.yaml': no such file; "),
        (["out=x.yaml", "collectives_from={tmp}/corrupt.yaml"],
         r"collectives_from='.*/corrupt\.yaml': not a readable YAML calibration: .* at line 3, column 1$"),
        (["out=x.yaml", "collectives_from={tmp}/fields.yaml"],
         r"collectives_from='.*/fields\.yaml': field 'attention_flops' is missing; a calibration has "),
        (["out=x.yaml", "collectives_from=3"], r"collectives_from=3 must be null, h100, h200, a100 or a "
                                               r"smartmoe-profile calibration file$"),
        (["out=x.yaml", "trainer.num_nodes=2", "collectives_from=h100"],
         r"collectives_from='h100': trainer\.devices=2 x trainer\.num_nodes=2 measures every collective \(intra and "
         r"inter\); leave collectives_from null$"),
        (["out=x.yaml", "collectives_from={tmp}/one.yaml"], r"collectives_from='.*/one\.yaml' has no inter fits, "
                                                            r"which this run does not measure; give h100, h200, a100 "),
        (["out=x.yaml", "trainer.devices=1", "collectives_from={tmp}/one.yaml"],
         r"collectives_from='.*/one\.yaml' has no intra or inter fits, which this run does not measure"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, overrides, message):
    (tmp_path / "corrupt.yaml").write_text("name: x\ncollectives: [1, 2\n")
    (tmp_path / "fields.yaml").write_text("name: x\n")
    replace(hardware.BUILTIN["h100"], collectives={}).to_yaml(tmp_path / "one.yaml")  # one device: no collectives
    cfg = _profile_cfg(["trainer.devices=2", *(o.format(tmp=tmp_path) for o in overrides)])
    with pytest.raises(SystemExit) as stop:
        profile.run(cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(r"smartmoe-profile: error: " + message, err), err


def test_unwritable_folder_exits_2(unwritable_dir, capsys):
    with pytest.raises(SystemExit) as stop:
        profile.run(_profile_cfg(["trainer.devices=2", f"out={unwritable_dir}/x.yaml"]))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (f"smartmoe-profile: error: out='{unwritable_dir}/x.yaml': directory "
                                               f"{unwritable_dir} is not writable")


def _profile_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
        return compose(config_name="profile", overrides=[*TINY, *overrides])


def test_write_leaves_the_old_file_whole_when_writing_fails(tmp_path, monkeypatch):
    """The file is written beside its final name and renamed: a failure mid-write leaves the previous one."""
    out = tmp_path / "hw.yaml"
    hardware.BUILTIN["h100"].to_yaml(out)
    before = out.read_text()

    def fail(self, path):
        Path(path).write_text("name: half")
        raise OSError("disk full")

    monkeypatch.setattr(hardware.Hardware, "to_yaml", fail)
    with pytest.raises(OSError, match="disk full"):
        profile.write(hardware.BUILTIN["a100"], out)
    assert out.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["hw.yaml"]
    monkeypatch.undo()
    profile.write(hardware.BUILTIN["a100"], out)
    assert hardware.load(out) == hardware.BUILTIN["a100"]


def tiny_shapes():
    """ModelShapes of a tiny model on one rank (built outside a process group: the memory model makes its own)."""
    cfg = GPTMoEConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=4,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=64))
    return ModelShapes.of(cfg, Layout(ParallelSizes(), global_batch=2), OptimConfig())


def test_overheads_are_the_model_steps_time_less_what_the_rates_price():
    """fit_overheads on made-up model-step times: the priced part (unpriced_seconds of 0 s, negated) plus a known
    layer (3 ms + 2 us per token) and ends (5 ms + 1 us per token) comes back."""
    shapes = tiny_shapes()
    hw = replace(hardware.BUILTIN["a100"], gemm_flops=1e9, expert_flops=2e9, expert_group_s=1e-4, attention_flops=5e8)
    layer, ends = (lambda t: 3e-3 + 2e-6 * t), (lambda t: 5e-3 + 1e-6 * t)
    times = {f"model/{n}/{b}": -unpriced_seconds(hw, shapes, n, b, 0.0) + n * layer(16 * b) + ends(16 * b)
             for n, b in shapes.overhead_cases}
    assert shapes.overhead_cases == [(1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (2, 8)]
    got = fit_overheads(hw, shapes, times)
    assert got == pytest.approx({"layer_s": 3e-3, "layer_token_s": 2e-6, "ends_s": 5e-3, "ends_token_s": 1e-6})


def test_dispatch_work_is_the_round_trip_less_one_rank_and_what_the_fits_price():
    """fit_dispatch on made-up round trips: 2 ranks take 1 ms (one rank) + the 4 all-to-alls of the balanced rows and
    the counts' all-to-all at the toy links + 3 ms; 4 ranks less than what is priced: 0, never negative."""
    shapes = tiny_shapes()  # 2 sequences x 16 tokens x top-2 = 64 rows per rank and micro-batch, d 32, fp32
    links = {op: {"intra": {2: hardware.Link(1e-4, 1e9), 4: hardware.Link(2e-4, 1e9)}} for op in hardware.OPS}
    hw = replace(hardware.BUILTIN["a100"], collectives=links)
    rows_sent = 64 * (2 - 1) / 2  # each rank sends away half its rows (2 of the 4 experts elsewhere)
    priced = 4 * (1e-4 + rows_sent * 32 * 4 / 1e9) + (1e-4 + 4 * 8 / 1e9)
    got = fit_dispatch(hw, shapes, {1: 1e-3, 2: 1e-3 + priced + 3e-3, 4: 1e-3})
    assert got == pytest.approx({2: 3e-3, 4: 0.0}, abs=1e-12)


def test_sync_wait_is_fitted_to_the_waits_beyond_the_collective_alone():
    """fit_sync on made-up rounds: compute of 0.5, 2 and 8 ms, then the all-reduce (1 ms back to back) and a wait of
    4 ms x work / (work + w) with w on fit_sync's grid, comes back; waits all at or below 0 (or no rounds: the ranks
    do not share cores) give 0."""
    work = {32: 0.5e-3, 128: 2e-3, 512: 8e-3}
    half = 0.5e-3 / 16 * (16 * 8e-3 / (0.5e-3 / 16)) ** (40 / 64)  # fit_sync's grid point 40 of 64: 5.66 ms
    times = {"collective": 1e-3} | {f"compute/{r}": w for r, w in work.items()}
    got = fit_sync(times | {f"reached/{r}": w + 1e-3 + 4e-3 * w / (w + half) for r, w in work.items()})
    assert got == pytest.approx({"sync_s": 4e-3, "sync_work_s": half}, rel=1e-9)
    hw = replace(hardware.BUILTIN["a100"], **got)
    assert hw.sync_wait(2e-3) == pytest.approx(4e-3 * 2e-3 / (2e-3 + half)) and hw.sync_wait(0.0) == 0.0
    none = {"sync_s": 0.0, "sync_work_s": 0.0}
    assert fit_sync(times | {f"reached/{r}": w + 0.9e-3 for r, w in work.items()}) == none
    assert fit_sync({}) == none


@pytest.mark.parametrize("key", ["sync_s", "sync_work_s"])
@pytest.mark.parametrize("bad", [-1e-3, float("inf"), "1 ms", True])
def test_a_calibration_with_a_bad_sync_figure_is_refused_naming_it(key, bad):
    data = {k: v for k, v in vars(hardware.BUILTIN["h100"]).items() if k != "collectives"}
    with pytest.raises(ConfigError, match=rf"^here: {key}=.* must be a finite number >= 0$"):
        hardware.from_dict({**data, "collectives": {}, key: bad}, "here")


@pytest.mark.parametrize("bad", [{1: 0.1}, {2: -0.1}, {2: float("nan")}, {"2": 0.1}, [0.1]])
def test_a_calibration_with_a_bad_dispatch_figure_is_refused_naming_it(bad):
    data = {k: v for k, v in vars(hardware.BUILTIN["h100"]).items() if k not in ("collectives", "dispatch_s")}
    with pytest.raises(ConfigError, match=r"^here: dispatch_s=.* must map group sizes >= 2 to seconds >= 0$"):
        hardware.from_dict({**data, "collectives": {}, "dispatch_s": bad}, "here")


# ---- collectives: the groups measured, a simulated second node, the fits of the scopes not measured ----------------


@pytest.mark.parametrize(
    "world,per_node,fits",
    [
        (16, 8, {(2, "intra"): [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
                 (4, "intra"): [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]],
                 (8, "intra"): [list(range(8)), list(range(8, 16))],
                 (2, "inter"): [[j, j + 8] for j in range(8)],
                 (16, "inter"): [list(range(16))]}),
        (32, 8, {(2, "intra"): [[r, r + 1] for r in range(0, 32, 2)],
                 (4, "intra"): [list(range(r, r + 4)) for r in range(0, 32, 4)],
                 (8, "intra"): [list(range(r, r + 8)) for r in range(0, 32, 8)],
                 (2, "inter"): [[j, j + 8] for j in range(8)] + [[j, j + 8] for j in range(16, 24)],
                 (4, "inter"): [[j, j + 8, j + 16, j + 24] for j in range(8)],
                 (16, "inter"): [list(range(16)), list(range(16, 32))],
                 (32, "inter"): [list(range(32))]}),
        (4, 2, {(2, "intra"): [[0, 1], [2, 3]], (2, "inter"): [[0, 2], [1, 3]], (4, "inter"): [[0, 1, 2, 3]]}),
        (8, 8, {(2, "intra"): [[0, 1], [2, 3], [4, 5], [6, 7]], (4, "intra"): [[0, 1, 2, 3], [4, 5, 6, 7]],
                (8, "intra"): [list(range(8))]}),
        (12, 6, {(2, "intra"): [[r, r + 1] for r in range(0, 12, 2)], (6, "intra"): [list(range(6)), list(range(6, 12))],
                 (2, "inter"): [[j, j + 6] for j in range(6)], (12, "inter"): [list(range(12))]}),
        (2, 1, {(2, "inter"): [[0, 1]]}),
        (1, 1, {}),
    ],
)
def test_collective_groups_are_nodes_whole_nodes_and_one_rank_per_node(world, per_node, fits):
    groups = collective_groups(world, per_node)
    assert {(n, scope): ranks for n, scope, ranks in groups} == fits
    assert [scope for _, scope, _ in groups] == sorted((scope for _, scope, _ in groups), key="intra inter".split().index)
    for n, scope, ranks in groups:  # every rank in one group of n, all measured at once
        assert sorted(r for g in ranks for r in g) == list(range(world)) and {len(g) for g in ranks} == {n}
        nodes = [{r // per_node for r in g} for g in ranks]
        assert all(len(x) == 1 for x in nodes) if scope == "intra" else all(len(x) > 1 for x in nodes)


def test_link_takes_the_one_rank_per_node_fits_for_small_inter_groups():
    """On 2 nodes of 8 the profile fits inter n=2 (one rank per node) and n=16 (both nodes): a pipeline boundary
    or a tied head between two nodes (n=2) gets the n=2 fit, not the whole world's; larger groups get n=16."""
    fits = {(n, scope): hardware.Link(1e-6 * n, 1e9 * (1 + (scope == "inter"))) for n, scope, _ in collective_groups(16, 8)}
    collectives = {op: {scope: {n: link for (n, s), link in fits.items() if s == scope} for scope in hardware.SCOPES}
                   for op in hardware.OPS}
    hw = replace(hardware.BUILTIN["h100"], collectives=collectives)
    assert hw.link("p2p", 2, inter=True) == fits[2, "inter"] and hw.link("all_reduce", 2, inter=True) == fits[2, "inter"]
    assert hw.link("all_reduce", 4, inter=True) == fits[16, "inter"]  # the nearest measured size at or above
    assert hw.link("all_to_all", 16, inter=True) == fits[16, "inter"]
    assert hw.link("all_to_all", 32, inter=True) == fits[16, "inter"]  # the largest measured
    assert hw.link("p2p", 2) == fits[2, "intra"] and hw.link("all_gather", 8) == fits[8, "intra"]
    inter_only = replace(hw, collectives={op: {"inter": s["inter"]} for op, s in collectives.items()})
    assert inter_only.link("p2p", 2) == fits[2, "inter"]  # a scope without fits takes the other's (1 GPU per node)


def collective_fits_of_short_samples(shapes, settings, device, per_node):
    """collective_fits with timed samples of 2 ms instead of 20 (SAMPLE_S): which groups are fitted, not how well;
    fewer collectives, which a busy 2-core box runs slowly (run_distributed)."""
    planner_profile.SAMPLE_S = 0.002
    return collective_fits(shapes, settings, device, planner_profile.own_groups(per_node))


@pytest.mark.timeout(200)  # 15-20 s at load 4-6; a run at load 8 with 20 ms samples took over 100 s
def test_four_processes_as_two_nodes_fit_intra_and_inter_groups(tmp_path):
    """4 gloo processes taken as 2 nodes of 2 (the CLI needs a launch per node): intra n=2 (ranks 0-1, 2-3), inter
    n=2 (ranks 0-2, 1-3: one per node) and n=4; every rank holds the same fits, which load."""
    settings = ProfileSettings(repeats=2, payload_bytes=(4096, 2**22))
    fits = run_distributed(4, collective_fits_of_short_samples, tiny_shapes(), settings, torch.device("cpu"), 2,
                           timeout=170)
    assert all(f == fits[0] for f in fits[1:])
    for op in hardware.OPS:
        assert {scope: list(sizes) for scope, sizes in fits[0][op].items()} == {"intra": [2], "inter": [2, 4]}, op
    replace(hardware.BUILTIN["h100"], gpus_per_node=2, collectives=fits[0]).to_yaml(tmp_path / "hw.yaml")
    hw = hardware.load(tmp_path / "hw.yaml")
    assert hw.link("p2p", 2, inter=True) == fits[0]["p2p"]["inter"][2] != hw.link("p2p", 2)


def test_collectives_from_lends_the_scopes_not_measured():
    """Each scope the run did not measure comes whole from collectives_from, with its GPUs per node when it lends
    the intra fits; the source says which is which."""
    h100, a100 = hardware.BUILTIN["h100"], hardware.BUILTIN["a100"]
    intra = {op: {"intra": {2: hardware.Link(1e-3, 1e9)}} for op in hardware.OPS}
    node = replace(a100, name="cpu", source="measured on box", gpus_per_node=2, collectives=intra)
    lent = with_collectives_from(node, CollectivesFrom("h100", h100))
    assert lent.collectives == {op: {"intra": intra[op]["intra"], "inter": h100.collectives[op]["inter"]}
                                for op in hardware.OPS}
    assert lent.gpus_per_node == 2 and lent.source == (f"measured on box; collectives: intra measured, inter from "
                                                       f"collectives_from=h100 ({h100.source})")
    one = replace(node, gpus_per_node=1, collectives={})
    lent = with_collectives_from(one, CollectivesFrom("/x/cpu4.yaml", node))
    assert lent.collectives == intra and lent.gpus_per_node == 2  # the node the intra fits describe
    assert lent.source == "measured on box; collectives: intra from collectives_from=/x/cpu4.yaml (measured on box)"
    alone = with_collectives_from(one, None)
    assert alone.collectives == {} and alone.scopes == [] and alone.gpus_per_node == 1
    assert alone.source == "measured on box; collectives: none (one device, no collectives_from)"


def test_nonnegative_least_squares_keeps_every_coefficient_at_or_above_zero():
    """Exact data come back; where the unconstrained solution has a negative coefficient, the best fit with that
    coefficient at 0 is returned (here y = 2 + 3 x - 0.01 x^2 on 0..4: the quadratic term goes, and the rest is
    the least-squares line through the points)."""
    xs = [0.0, 1.0, 2.0, 3.0, 4.0]
    ones, squares = [1.0] * 5, [x * x for x in xs]
    assert nonnegative_least_squares([ones, xs, squares], [2 + 3 * x + 0.5 * x * x for x in xs]) == pytest.approx(
        [2.0, 3.0, 0.5])
    got = nonnegative_least_squares([ones, xs, squares], [2 + 3 * x - 0.01 * x * x for x in xs])
    slope = sum((x - 2) * (2 + 3 * x - 0.01 * x * x) for x in xs) / sum((x - 2) ** 2 for x in xs)
    intercept = sum(2 + 3 * x - 0.01 * x * x for x in xs) / 5 - 2 * slope
    assert got == pytest.approx([intercept, slope, 0.0])
    assert nonnegative_least_squares([ones], [-1.0] * 5) == [0.0]  # nothing non-negative fits better than 0


def sharing_of_a_matmul_loop() -> float:
    a = torch.randn(192, 192)
    return measure_sharing(lambda: a @ a @ a, torch.device("cpu"), 4, repeats=3)


@pytest.mark.timeout(120)
def test_four_processes_on_fewer_cores_measure_how_much_slower_they_run_together():
    """Hardware.sharing: 4 ranks of one node on this box's cores. With 2 cores each rank runs about 2x slower when
    all compute (measured here 2.1-2.4 on the model step); with a core each, 1 without measuring."""
    got = run_distributed(4, sharing_of_a_matmul_loop, timeout=100)
    assert len(set(got)) == 1  # every rank holds the same figure
    cores = len(os.sched_getaffinity(0))
    # > 1.1, not about 2: one run here measured 1.15 (cause not found; the next three passed)
    assert got[0] > 1.1 if cores <= 2 else (got[0] == 1.0 if cores >= 4 else got[0] >= 1.0), (got, cores)


def sync_rounds(shapes: ModelShapes) -> tuple[dict[str, float], dict[str, float]]:
    settings = ProfileSettings(repeats=3, payload_bytes=(4096, 65536, 1048576))
    groups = own_groups(4)
    times = sync_times(shapes, settings, torch.device("cpu"), groups, 4)
    return times, fit_sync(times)


@pytest.mark.timeout(150)
def test_four_processes_on_fewer_cores_time_compute_with_and_without_a_collective_after_it():
    """sync_times on 4 ranks of one node: on this box's 2 cores, rounds of compute on 8 x 4^k rows (from about
    SYNC_MIN_S to past SYNC_MAX_S), each with and without the node's all-reduce after it, the same on every rank;
    with a core each, nothing (the ranks do not share cores)."""
    got = run_distributed(4, sync_rounds, tiny_shapes(), timeout=130)
    assert all(g == got[0] for g in got)  # every rank holds the same figures
    times, fit = got[0]
    if len(os.sched_getaffinity(0)) >= 4:
        assert times == {} and fit == {"sync_s": 0.0, "sync_work_s": 0.0}
        return
    rows = sorted(int(k.split("/")[1]) for k in times if k.startswith("compute/"))
    assert sorted(times) == sorted(["collective", *(f"{k}/{r}" for k in ("compute", "reached") for r in rows)])
    assert len(rows) >= 2 and rows == [rows[0] * 4**i for i in range(len(rows))] and rows[0] % 8 == 0, rows
    assert times[f"compute/{rows[-1]}"] > 4 * times[f"compute/{rows[0]}"]  # at least 16x the rows
    assert all(math.isfinite(v) and v >= 0 for v in fit.values()), fit


def test_nonnegative_least_squares_does_not_care_how_its_columns_are_scaled():
    """Columns 1e10 and 1e3 apart in size (FLOPs per second against groups per second: the expert fit's) give the
    same two-term solution as columns of like size."""
    rows, groups = [16.0, 32.0, 64.0, 128.0, 32.0, 64.0], [1.0, 1.0, 1.0, 1.0, 4.0, 4.0]
    times = [r * 2e-5 + g * 3e-4 for r, g in zip(rows, groups)]
    flops = [[r * 1e10 for r in rows], groups]
    got = nonnegative_least_squares(flops, times)
    assert got == pytest.approx([2e-15, 3e-4])
