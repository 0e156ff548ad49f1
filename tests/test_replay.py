"""smartmoe-replay on tiny handmade traces: figures by hand, and one clear error per malformed input."""

import json
import re

import numpy as np
import pytest

from cli import run_main
from lightning_smartmoe import replay as replay_cli
from lightning_smartmoe.planner.hardware import OPS, Hardware, Link

# Traces of 3 samples x 2 data-parallel ranks x 2 layers x 2 micro-batches x 4 experts, iterations 1, 11, 21.
# Layer 0 totals per sample: [1, 1, 4, 2], [1, 1, 4, 2], [2, 2, 2, 2]; layer 1: [2, 2, 2, 2] throughout.
LAYER0 = [[1, 1, 4, 2], [1, 1, 4, 2], [2, 2, 2, 2]]
LAYER1 = [[2, 2, 2, 2]] * 3


def toy_hardware(tmp_path, a2a: float = 40.0, p2p: float = 160.0) -> list[str]:
    """Overrides for a toy machine and expert: experts of 10 x 2 (40 parameters, fp32), 240 FLOP/s, so 1 s of
    forward + backward per row; a row's 40 bytes over the all-to-all at `a2a` bytes/s (40: on 2 ranks the busiest
    rank's traffic is half its rows in each of the 4 calls, dispatch and combine forward and backward, so the
    all-to-all adds 4 x 0.5 = 2 s per row of the busiest rank; a migrated expert's
    weight and moments, 480 bytes, take 12 s); one expert's 160-byte gradient over point-to-point at `p2p` bytes/s
    (160: 1 s)."""
    fits = {"all_to_all": Link(0.0, a2a), "p2p": Link(0.0, p2p)}
    collectives = {op: {"intra": {2: fits.get(op, Link(0.0, 1e30))}} for op in OPS}
    hw = Hardware("toy", "test figures", 8, 1.0, 1.0, 240.0, 0.0, 1.0, 1.0, collectives)
    path = tmp_path / f"toy_{a2a:g}_{p2p:g}.yaml"
    hw.to_yaml(path)
    return [f"hardware={path}", "d_model=10", "expert_hidden=2", "precision=32-true"]


A2A = 3.0  # seconds per row of the busiest rank on the toy machine: 1 of compute, 2 of all-to-all


def split(total: list[int]) -> np.ndarray:
    """Expert totals [E] -> [dp_rank=2, micro_batch=2, E] summing back to them."""
    parts = np.zeros((2, 2, len(total)), dtype=np.uint16)
    for e, n in enumerate(total):
        for i in range(n):
            parts[i % 2, (i // 2) % 2, e] += 1
    return parts


def write_trace(path, **arrays):
    np.savez(path, **arrays)
    return path


def make_trace(path, layer0: list[list[int]], layer1: list[list[int]]):
    counts = np.zeros((3, 2, 2, 2, 4), dtype=np.uint16)  # sample, dp_rank, layer, micro_batch, expert
    for s in range(3):
        counts[s, :, 0] = split(layer0[s])
        counts[s, :, 1] = split(layer1[s])
    assert (counts.astype(int).sum(axis=(1, 3)) == np.array([layer0, layer1]).transpose(1, 0, 2)).all()
    return write_trace(path, counts=counts, iterations=np.array([1, 11, 21]))


@pytest.fixture
def tiny_trace(tmp_path):
    return make_trace(tmp_path / "tiny.npz", LAYER0, LAYER1)


def cli(monkeypatch, capsys, tmp_path, *overrides):
    """Run main() in-process; returns (exit code, stdout, stderr)."""
    return run_main(replay_cli.main, "smartmoe-replay", monkeypatch, capsys, tmp_path, *overrides)


def summary(monkeypatch, capsys, tmp_path, *overrides) -> dict:
    code, out, err = cli(monkeypatch, capsys, tmp_path, *overrides)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_static_figures_by_hand(monkeypatch, capsys, tmp_path, tiny_trace):
    got = summary(monkeypatch, capsys, tmp_path, f"trace={tiny_trace}", "ranks=2", *toy_hardware(tmp_path))
    # layer 0, ranks {0, 1} | {2, 3}: max 6 / 4, 6 / 4, 4 / 4; layer 1: 1 throughout
    assert got["per_layer"] == pytest.approx([4 / 3, 1.0], abs=1e-6)
    assert got["max_over_perfect"] == pytest.approx(7 / 6, abs=1e-6)
    assert (got["switches"], got["moved_experts"], got["moved_bytes"]) == (0, 0, 0)
    assert got["step_ms"] == pytest.approx(1e3 * A2A * (6 + 6 + 4 + 4 * 3) / 6)  # busiest rank's rows
    # perfect balance: half the rows on each rank, which receives half of them from the other: 8 rows, 2 ranks
    assert got["ideal_step_ms"] == pytest.approx(1e3 * A2A * 4)
    assert got["total_ms_per_step"] == got["step_ms"]
    assert got["total_over_ideal"] == pytest.approx(got["step_ms"] / got["ideal_step_ms"], rel=1e-5)
    assert (got["samples"], got["layers"], got["experts"]) == (3, 2, 4)


def test_greedy_figures_by_hand(monkeypatch, capsys, tmp_path, tiny_trace):
    got = summary(monkeypatch, capsys, tmp_path, f"trace={tiny_trace}", "ranks=2", "placement.policy=greedy",
                  "placement.interval=1", "placement.window=1", "placement.min_gain=-inf", *toy_hardware(tmp_path))
    # layer 0: before sample 1, loads [1, 1, 4, 2] give 4 -> rank 1 (tie, its rank), 2 -> rank 0, 1 -> rank 0,
    # 1 -> rank 1 (rank 0 full): {0, 3} | {2, 1}, max 5 < 6, taken, two experts swap ranks. Sample 1 scores 5 / 4;
    # before sample 2 the same answer is not strictly better and is kept; sample 2 scores 4 / 4.
    # layer 1: uniform load, LPT ties the current max of 4, never switches.
    assert got["per_layer"] == pytest.approx([(1.5 + 1.25 + 1.0) / 3, 1.0], abs=1e-6)
    assert got["max_over_perfect"] == pytest.approx((1.5 + 1.25 + 1.0 + 3) / 6, abs=1e-6)
    assert (got["switches"], got["moved_experts"], got["local_copies"]) == (1, 2, 0)
    assert got["moved_bytes"] == 2 * 40 * 3 * 4  # weight and two moments of 40 fp32 parameters each
    assert got["step_ms"] == pytest.approx(1e3 * A2A * (6 + 5 + 4 + 4 * 3) / 6)
    # the two experts swap ranks in one all-to-all: each rank sends one and receives one, 12 s, over 2 layers x 30 steps
    assert got["migration_ms_per_step"] == pytest.approx(1e3 * 12 / (2 * 30))
    assert got["total_ms_per_step"] == pytest.approx(got["step_ms"] + got["migration_ms_per_step"])
    assert got["decision_ms"] > 0


@pytest.mark.parametrize(("interval", "layer0", "switches"), [(1, (2.0 + 2.0 + 1.0) / 3, 2), (2, 2.0, 1)])
def test_decisions_see_only_earlier_samples_every_interval(monkeypatch, capsys, tmp_path, interval, layer0, switches):
    trace = make_trace(tmp_path / "shift.npz", [[4, 4, 0, 0], [4, 0, 0, 4], [4, 0, 0, 4]], LAYER1)
    got = summary(monkeypatch, capsys, tmp_path, f"trace={trace}", "ranks=2", "placement.policy=greedy",
                  f"placement.interval={interval}", "placement.window=1", "placement.min_gain=-inf")
    # before sample 1, planned from sample 0: {0, 3} | {1, 2}, which meets sample 1's hot experts 0 and 3 together
    # (8 / 4; a planner peeking at sample 1 would split them). Before sample 2 (interval 1 only), planned from
    # sample 1: {0, 2} | {3, 1}, 4 / 4.
    assert got["per_layer"][0] == pytest.approx(layer0, abs=1e-6)
    assert got["switches"] == switches


@pytest.mark.parametrize(("window", "last"), [(1, 4 / 3), (2, 2.0)])
def test_window_averages_the_samples_before_a_decision(monkeypatch, capsys, tmp_path, window, last):
    trace = make_trace(tmp_path / "window.npz", [[1, 2, 0, 1], [1, 1, 1, 4], [0, 0, 2, 4]], LAYER1)
    got = summary(monkeypatch, capsys, tmp_path, f"trace={trace}", "ranks=2", "placement.policy=greedy",
                  "placement.interval=1", f"placement.window={window}", "placement.min_gain=-inf")
    # sample 0: 3 / 2. Before sample 1, from [1, 2, 0, 1]: {2, 1} | {0, 3}; sample 1: 5 / 3.5.
    # Before sample 2, window 1 sees [1, 1, 1, 4]: LPT ties the current max of 5, kept; sample 2: 4 / 3.
    # Window 2 sees [1, 1.5, 0.5, 2.5]: {0, 1} | {2, 3} (max 3 < 3.5) is taken; sample 2: 6 / 3.
    assert got["per_layer"][0] == pytest.approx((1.5 + 5 / 3.5 + last) / 3, abs=1e-6)


def test_online_rule_gates_switches(monkeypatch, capsys, tmp_path, tiny_trace):
    base = [f"trace={tiny_trace}", "ranks=2", "placement.policy=greedy", "placement.interval=1", "placement.window=1"]
    # Before sample 1 greedy's answer was planned from sample 0, the only load seen: no evidence, no switch.
    # Before sample 2 it is planned from sample 1 and judged on sample 0, where it saves one row of the busiest
    # rank (3 s), expected for the 10 steps sample 0 stands for: 30 s; the two experts swap ranks in 12 s.
    # At 10x the all-to-all bandwidth a row costs 1.2 s and the swap 1.2 s: 12 - 1.2 = 10.8 s.
    toy, fast = toy_hardware(tmp_path), toy_hardware(tmp_path, a2a=400.0)
    assert summary(monkeypatch, capsys, tmp_path, *base, *toy)["switches"] == 1
    assert summary(monkeypatch, capsys, tmp_path, *base, *toy, "placement.min_gain=17.9")["switches"] == 1
    assert summary(monkeypatch, capsys, tmp_path, *base, *toy, "placement.min_gain=18.1")["switches"] == 0
    assert summary(monkeypatch, capsys, tmp_path, *base, *fast, "placement.min_gain=10.7")["switches"] == 1
    assert summary(monkeypatch, capsys, tmp_path, *base, *fast, "placement.min_gain=10.9")["switches"] == 0
    only_first = [*base[:3], "placement.interval=2", "placement.window=1"]  # one decision, before sample 1
    assert summary(monkeypatch, capsys, tmp_path, *only_first, *fast, "placement.min_gain=-1.1")["switches"] == 0  # -1.2 s


def test_balanced_figures_by_hand(monkeypatch, capsys, tmp_path):
    trace = make_trace(tmp_path / "hot.npz", [[6, 1, 1, 0]] * 3, LAYER1)
    common = [f"trace={trace}", "ranks=2", "placement.interval=1", "placement.window=1", "placement.min_gain=-inf",
              "placement.extra_slots=1", *toy_hardware(tmp_path, p2p=1e30)]  # replica exchange free
    greedy = summary(monkeypatch, capsys, tmp_path, *common, "placement.policy=greedy")
    balanced = summary(monkeypatch, capsys, tmp_path, *common, "placement.policy=balanced")
    # sample 0, contiguous: 7 / 4. greedy: {0, 3} | {1, 2}, 6 / 4 on samples 1 and 2.
    assert greedy["per_layer"] == pytest.approx([(1.75 + 1.5 + 1.5) / 3, 1.0], abs=1e-6)
    # balanced: expert 0 on both ranks (3 + 3), 1 -> rank 0, 2 and 3 -> rank 1: 4 | 4, one copy of expert 0 into
    # rank 1's extra slot. Layer 1 is uniform: nothing beats the contiguous placement, no switch.
    assert balanced["per_layer"] == pytest.approx([(1.75 + 1.0 + 1.0) / 3, 1.0], abs=1e-6)
    assert (balanced["switches"], balanced["moved_experts"], balanced["local_copies"]) == (1, 1, 0)
    assert balanced["step_ms"] == pytest.approx(1e3 * A2A * (7 + 4 + 4 + 4 * 3) / 6)


@pytest.mark.parametrize("overlap,exposed", [("true", 0.5), ("false", 1.0)])
def test_later_layers_hide_replica_exchange_under_backward(monkeypatch, capsys, tmp_path, overlap, exposed):
    """One gradient copy costs 1 s, half in each phase; with overlap, layer 1's reduce-scatter hides under layer
    0's backward in the last of the 2 micro-batches (2/3 of 4 s / 2), layer 0's exchange is charged in full."""
    trace = make_trace(tmp_path / "hot2.npz", [[6, 1, 1, 0]] * 3, [[6, 1, 1, 0]] * 3)
    figures = summary(monkeypatch, capsys, tmp_path, f"trace={trace}", "ranks=2", "placement.interval=1",
                      "placement.window=1", "placement.min_gain=-inf", "placement.extra_slots=1",
                      *toy_hardware(tmp_path), "placement.policy=balanced", f"overlap_replica_sync={overlap}")
    assert figures["overlap_replica_sync"] is (overlap == "true")
    layer0 = A2A * 7 + 2 * (A2A * 4 + 1.0)  # contiguous, then replicated 4 | 4 with its exchange in full
    layer1 = A2A * 7 + 2 * (A2A * 4 + exposed)
    assert figures["step_ms"] == pytest.approx(1e3 * (layer0 + layer1) / 6)


def npz(tmp_path, name, **arrays):
    return write_trace(tmp_path / f"{name}.npz", **arrays)


GOOD_COUNTS = np.ones((3, 1, 1, 1, 4), dtype=np.uint16)
STEPS = np.array([1, 11, 21])


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda p: p / "absent.npz", [], "no such file"),
        (lambda p: npz(p, "nocounts", iterations=STEPS), [], "key 'counts' missing"),
        (lambda p: npz(p, "nosteps", counts=GOOD_COUNTS), [], "key 'iterations' missing"),
        (lambda p: npz(p, "ndim", counts=GOOD_COUNTS[:, 0], iterations=STEPS), [], r"expected 5 non-empty axes"),
        (lambda p: npz(p, "neg", counts=-GOOD_COUNTS.astype(np.int16), iterations=STEPS), [], "negative entries"),
        (lambda p: npz(p, "float", counts=GOOD_COUNTS * 0.5, iterations=STEPS), [], "dtype float64"),
        (lambda p: npz(p, "steps", counts=GOOD_COUNTS, iterations=STEPS[::-1]), [], "strictly increasing"),
        (lambda p: npz(p, "ok", counts=GOOD_COUNTS, iterations=STEPS), ["ranks=3"], r"allowed: \[1, 2, 4\]"),
        (lambda p: npz(p, "ok", counts=GOOD_COUNTS, iterations=STEPS), ["placement.extra_slots=-1"],
         "placement.extra_slots=-1 must be an integer >= 0"),
        (lambda p: npz(p, "ok", counts=GOOD_COUNTS, iterations=STEPS), ["placement.policy=lpt"],
         "placement.policy='lpt' is unknown; allowed: static, greedy, balanced"),
        (lambda p: npz(p, "ok", counts=GOOD_COUNTS, iterations=STEPS), ["placement.interval=epoch"],
         "placement.interval='epoch' must be an integer >= 1"),
        (lambda p: npz(p, "ok", counts=GOOD_COUNTS, iterations=STEPS), ["hardware=h900"],
         r"hardware='h900': no such file; give a built-in name \(h100, h200, a100\)"),
        (lambda p: npz(p, "ok", counts=GOOD_COUNTS, iterations=STEPS), ["d_model=0"],
         r"d_model=0 must be an integer >= 1"),
        (lambda p: npz(p, "ok", counts=GOOD_COUNTS, iterations=STEPS), ["precision=fp8"],
         r"precision='fp8' is unknown; allowed: 32-true"),
        (lambda p: npz(p, "ok", counts=GOOD_COUNTS, iterations=STEPS), ["overlap_replica_sync=2"],
         "overlap_replica_sync=2 must be true or false"),
    ],
)
def test_malformed_input_gives_one_clear_error(monkeypatch, capsys, tmp_path, make, extra, message):
    code, out, err = cli(monkeypatch, capsys, tmp_path, f"trace={make(tmp_path)}", "ranks=2", *extra)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smartmoe-replay: error: ")
    assert re.search(message, lines[0])


def test_missing_trace_argument(monkeypatch, capsys, tmp_path):
    code, _, err = cli(monkeypatch, capsys, tmp_path)
    assert code == 2 and "trace is required" in err and "Traceback" not in err
