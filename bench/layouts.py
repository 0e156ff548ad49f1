"""Every parallel layout of 4 ranks, one fixed tiny GPT-MoE: step time, memory per rank and pipeline bubble.

One spawn of 4 gloo processes (CPU, fp32, 1 thread each, not pinned: 4 ranks share this machine's cores) loops over
every valid layout: all (dp, tp, pp) with dp * tp * pp = 4, and every ep dividing both dp * tp (expert parallelism
folds over the data- and tensor-parallel ranks of a stage) and num_experts. Layouts with pp > 1 cut each batch into
--microbatches micro-batches and run the 1F1B schedule, and also GPipe (--no-gpipe to skip). Each layout is a real
Lightning `Trainer.fit` with `SmartMoEStrategy(dp, tp, pp, ep, microbatches, pp_schedule)` on the existing process
group (as tests/tiny.py: Lightning sees LOCAL_RANK and does not spawn; the strategy builds its mesh and groups).
Model: GPTMoE, d_model 128, 4 heads, 4 layers each with an MoE FFN (8 experts, top-2, naive gate, dropless, expert
hidden 512, aux loss 0.01), vocab 256, seq 64; global batch 16 sequences (1024 tokens) per step; AdamW, gradient
clipping at norm 1. Data: a fixed random uint16 .bin corpus written to a temporary folder.

Per layout: --warmup steps, then --steps timed steps, then --mem-steps memory steps (timings of the memory steps are
not used, as their hooks cost time).

step_ms      per rank, perf_counter from on_train_batch_start to on_train_batch_end (forward, backward or the whole
             pipeline schedule, gradient sync, clipping, AdamW step, Lightning's logging); a step's time is its
             slowest rank's; figure = median over the timed steps.
peak_mem_mb  per rank, an accounting of the bytes torch holds (torch does not track allocations on CPU):
               state   = this rank's parameters + their gradients (at on_before_optimizer_step) + AdamW state
                         (exp_avg, exp_avg_sq, step), each storage counted once;
               act     = peak over the memory steps of the bytes of tensors autograd keeps for backward, tracked with
                         torch.autograd.graph.saved_tensors_hooks: each saved tensor's storage is counted once while
                         any saved reference to it lives (parameters excluded: they are in state). Under pipelining
                         this includes every micro-batch in flight (at most pp - stage on a 1F1B stage, all
                         micro-batches under GPipe).
             peak_mem_mb = state + act. Not counted: transient tensors that are not saved for backward (the largest
             is one op's output or a gradient all-reduce bucket copy), pipeline send/receive buffers, allocator
             slack. As a cross-check, rss_hwm_mb is the process's peak resident set (VmHWM, reset through
             /proc/self/clear_refs at on_train_start, read at on_train_end), which also holds the interpreter,
             libraries and heap cached from earlier layouts, so it is comparable between layouts only roughly.
bubble       (pp > 1) measured in the timed steps. Each stage's `PipelineStage.forward_one_chunk`,
             `backward_one_chunk` and the schedule's loss computation are wrapped with perf_counter: a stage's busy
             time is the sum of those (its compute, including the tensor- and expert-parallel collectives inside the
             stage, excluding the stage-to-stage send/receive waits). The schedule's span is taken per pipeline (the
             pp ranks with the same dp and tp coordinates): from the earliest entry into `schedule.step` to the last
             exit, over its ranks (perf_counter is CLOCK_MONOTONIC, shared by the processes). bubble = 1 - mean over
             stages of busy / span, averaged over the pipelines; figure = median over timed steps. Theoretical bubble
             of 1F1B and GPipe with equal stages and free communication: (pp - 1) / (microbatches + pp - 1), of
             interleaved 1F1B with v stages per rank (pp - 1) / (v * microbatches + pp - 1);
             bubble_ratio = measured / theoretical. Note: with 4 ranks on fewer cores, busy time is wall time that
             includes waiting for a core; busy_cpu_ms (thread CPU time of the same spans) shows how much.

Run:  .venv/bin/python bench/layouts.py            (every layout, 1F1B and GPipe; a few minutes)
      .venv/bin/python bench/layouts.py --quick    (fewer steps, no GPipe)
Printed: a table, then as the last line one JSON object with all figures. A layout that fails or hangs is reported
(its traceback in the JSON under "failed") and the remaining layouts run in a fresh spawn.
"""

import argparse
import gc
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # run_distributed

from distributed import run_distributed  # noqa: E402
from machine import cpu_pressure, reset_peak_rss, vm_mib  # noqa: E402

import lightning.pytorch as pl  # noqa: E402

from lightning_smartmoe import SmartMoEStrategy  # noqa: E402
from lightning_smartmoe.data import TokenDataModule  # noqa: E402
from lightning_smartmoe.models import GPTMoEConfig, MoELMModule, OptimConfig  # noqa: E402
from lightning_smartmoe.moe import MoEConfig  # noqa: E402
from lightning_smartmoe.planner.memory import SavedActivations  # noqa: E402

WORLD = 4
THREADS = 1
MB = 2**20
MODEL = dict(vocab_size=256, seq_len=64, n_layers=4, d_model=128, n_heads=4)
MOE = dict(num_experts=8, top_k=2, gate="naive", capacity_factor=None, aux_loss_coeff=0.01, z_loss_coeff=0.0)
GLOBAL_BATCH = 16


def model_config() -> GPTMoEConfig:
    return GPTMoEConfig(**MODEL, moe=MoEConfig(**MOE))


def layouts(microbatches: int, gpipe: bool, world: int = WORLD) -> list[dict]:
    """Every valid layout of `world` ranks for the model, pure data parallelism first. With tp > 1 also expert tensor
    parallelism (ep dividing dp); with pp > 1 also interleaved 1F1B with 2 stages per rank where the layers allow."""
    out = []
    for pp in (1, 2, 4):
        for tp in (1, 2, 4):
            if world % (pp * tp):
                continue
            dp = world // (pp * tp)
            if MODEL["n_layers"] % pp or any(MODEL[k] % tp for k in ("n_heads", "vocab_size", "seq_len")):
                continue
            schedules = [("-", 1)]
            if pp > 1:
                schedules = [("1f1b", 1)] + [("gpipe", 1)] * gpipe
                schedules += [("interleaved_1f1b", 2)] * (MODEL["n_layers"] % (2 * pp) == 0)
            for expert_tp in (False, True) if tp > 1 else (False,):
                for ep in (1, 2, 4, 8):
                    if (dp if expert_tp else dp * tp) % ep or MOE["num_experts"] % ep:
                        continue
                    for schedule, virtual in schedules:
                        m = microbatches if pp > 1 else 1
                        name = f"dp{dp}.tp{tp}.pp{pp}.ep{ep}" + ".etp" * expert_tp + (f".{schedule}" if pp > 1 else "")
                        out.append(dict(name=name, dp=dp, tp=tp, pp=pp, ep=ep, expert_tp=expert_tp, schedule=schedule,
                                        virtual_stages=virtual, microbatches=m))
    return out


# ---- instrumentation ---------------------------------------------------------------------------------------------


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = SavedActivations.storage_key(t)
        if key is not None and key not in seen:
            seen.add(key)
            total += key[1]
    return total


class Probe(pl.Callback):
    """Step times, state and activation bytes, RSS peak and pipeline stage timings on this rank."""

    def __init__(self, warmup: int, steps: int, mem_steps: int) -> None:
        self.warmup, self.steps, self.mem_steps = warmup, steps, mem_steps
        self.step_s: list[float] = []
        self.pipe: list[dict] = []  # per timed step: fwd/bwd/loss (wall, cpu) sums, schedule (start, end)
        self._cur = self._fresh()
        self._t0 = 0.0
        self._hooks = None
        self._saved: SavedActivations | None = None
        self._wrapped = False
        self.grad_bytes = 0
        self.rss_start = self.rss_hwm = float("nan")
        self.hwm_reset = False
        self.train_start = 0.0

    @staticmethod
    def _fresh() -> dict:
        return {"fwd": [0.0, 0.0, 0], "bwd": [0.0, 0.0, 0], "loss": [0.0, 0.0, 0], "span": [None, None]}

    def _timed(self, fn, key):
        def wrapped(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = fn(*args, **kwargs)
            rec = self._cur[key]
            rec[0] += time.perf_counter() - t0
            rec[1] += time.thread_time() - c0
            rec[2] += 1
            return out

        return wrapped

    def _wrap_pipeline(self, runner) -> None:
        schedule = runner.schedule
        for stage in getattr(schedule, "_stages", None) or [schedule._stage]:  # interleaved schedules hold several
            stage.forward_one_chunk = self._timed(stage.forward_one_chunk, "fwd")
            stage.backward_one_chunk = self._timed(stage.backward_one_chunk, "bwd")
        schedule._maybe_compute_loss = self._timed(schedule._maybe_compute_loss, "loss")
        step = schedule.step

        def timed_step(*args, **kwargs):
            self._cur["span"][0] = time.perf_counter()
            out = step(*args, **kwargs)
            self._cur["span"][1] = time.perf_counter()
            return out

        schedule.step = timed_step
        self._wrapped = True

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = time.perf_counter()
        self.hwm_reset = reset_peak_rss()
        self.rss_start = vm_mib("VmRSS")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        runner = getattr(trainer.strategy, "pipeline", None)
        if runner is not None and not self._wrapped and runner.schedule is not None:
            self._wrap_pipeline(runner)  # the schedule is built in the first step
        self._cur = self._fresh()
        if batch_idx >= self.warmup + self.steps:  # a memory step
            self._saved = self._saved or SavedActivations({p.untyped_storage().data_ptr() for p in pl_module.parameters()})
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._saved.pack, self._saved.unpack)
            self._hooks.__enter__()
        self._t0 = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_bytes = max(self.grad_bytes, _nbytes(grads))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dt = time.perf_counter() - self._t0
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        if self.warmup <= batch_idx < self.warmup + self.steps:
            self.step_s.append(dt)
            if self._wrapped:
                self.pipe.append(self._cur)

    def on_train_end(self, trainer, pl_module) -> None:
        self.rss_hwm = vm_mib("VmHWM")
        self.param_bytes = _nbytes(pl_module.parameters())
        opt = trainer.optimizers[0]
        self.opt_bytes = _nbytes(t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))
        self.params = sum(p.numel() for p in pl_module.parameters())

    def summary(self) -> dict:
        act = self._saved.peak if self._saved is not None else 0
        return {
            "step_s": self.step_s,
            "pipe": self.pipe,
            "param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes, "opt_bytes": self.opt_bytes,
            "act_bytes": act, "params": self.params,
            "rss_start_mb": self.rss_start, "rss_hwm_mb": self.rss_hwm, "hwm_reset": self.hwm_reset,
        }


# ---- one layout, all layouts in one spawn ------------------------------------------------------------------------


def run_layout(lay: dict, cfg: dict) -> dict:
    t0 = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    module = MoELMModule(model_config(), OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2))
    dm = TokenDataModule(cfg["corpus"], seq_len=MODEL["seq_len"], global_batch_size=GLOBAL_BATCH,
                         vocab_size=MODEL["vocab_size"])
    probe = Probe(cfg["warmup"], cfg["steps"], cfg["mem_steps"])
    strategy = SmartMoEStrategy(dp=lay["dp"], tp=lay["tp"], pp=lay["pp"], ep=lay["ep"], expert_tp=lay["expert_tp"],
                                microbatches=lay["microbatches"], virtual_stages=lay["virtual_stages"],
                                pp_schedule=lay["schedule"] if lay["pp"] > 1 else "1f1b")
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, max_steps=cfg["warmup"] + cfg["steps"] + cfg["mem_steps"],
        strategy=strategy, gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )
    trainer.fit(module, dm)
    out = probe.summary()
    out["setup_s"] = probe.train_start - t0
    out["layout_s"] = time.perf_counter() - t0
    out["rank"] = dist.get_rank()
    return out


def worker(todo: list[dict], cfg: dict) -> None:
    """Run the layouts in order; rank 0 writes <index>.started before and <index>.json after each one."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(THREADS)
    rank, out = dist.get_rank(), Path(cfg["out"])
    for lay in todo:
        if rank == 0:
            (out / f"{lay['index']:02d}.started").write_text(lay["name"])
        try:
            mine = run_layout(lay, cfg)
        except BaseException as e:
            raise RuntimeError(f"LAYOUT_FAILED[{lay['index']}] {lay['name']}") from e
        ranks: list[dict] = [None] * WORLD  # type: ignore[list-item]
        dist.all_gather_object(ranks, mine)
        if rank == 0:
            (out / f"{lay['index']:02d}.json").write_text(json.dumps({"layout": lay, "ranks": ranks}))
        gc.collect()
        dist.barrier()


def run_all(lays: list[dict], cfg: dict, timeout: float) -> tuple[dict, dict]:
    """Run every layout, spawning again after a failure or hang (skipping the layout that broke).
    Returns ({index: result}, {name: error})."""
    results, failed = {}, {}
    todo = list(lays)
    while todo:
        try:
            run_distributed(WORLD, worker, todo, cfg, timeout=timeout)
            err = None
        except (RuntimeError, TimeoutError) as e:
            err = str(e)
        for lay in todo:
            path = Path(cfg["out"]) / f"{lay['index']:02d}.json"
            if path.exists():
                results[lay["index"]] = json.loads(path.read_text())
        rest = [lay for lay in todo if lay["index"] not in results]
        if err is None:
            if rest:
                raise RuntimeError(f"layouts without results: {[lay['name'] for lay in rest]}")
            break
        m = re.search(r"LAYOUT_FAILED\[(\d+)\]", err)
        if m is None:  # a hang, or a rank died: blame the layout that started last
            started = sorted(Path(cfg["out"]).glob("*.started"))
            broke = int(started[-1].stem) if started else rest[0]["index"]
        else:
            broke = int(m.group(1))
        name = next(lay["name"] for lay in lays if lay["index"] == broke)
        failed[name] = err
        print(f"!! layout {name} failed; continuing with the rest in a fresh spawn\n{err}", flush=True)
        todo = [lay for lay in rest if lay["index"] != broke]
    return results, failed


# ---- figures -----------------------------------------------------------------------------------------------------


def summarize(res: dict, cfg: dict) -> dict:
    lay, ranks = res["layout"], res["ranks"]
    steps = len(ranks[0]["step_s"])
    slowest = [max(r["step_s"][i] for r in ranks) * 1e3 for i in range(steps)]
    out = {k: lay[k] for k in ("name", "dp", "tp", "pp", "ep", "expert_tp", "schedule", "virtual_stages", "microbatches")}
    out["step_ms"] = round(statistics.median(slowest), 2)
    out["step_ms_min_max"] = [round(min(slowest), 2), round(max(slowest), 2)]
    out["step_ms_by_rank"] = [round(statistics.median(r["step_s"]) * 1e3, 2) for r in ranks]
    out["tokens_per_s"] = round(GLOBAL_BATCH * MODEL["seq_len"] / (out["step_ms"] / 1e3), 1)
    out["params_by_rank"] = [r["params"] for r in ranks]
    state = [(r["param_bytes"] + r["grad_bytes"] + r["opt_bytes"]) / MB for r in ranks]
    act = [r["act_bytes"] / MB for r in ranks]
    out["peak_mem_mb"] = [round(s + a, 2) for s, a in zip(state, act)]
    out["state_mb"] = [round(s, 2) for s in state]
    out["act_mb"] = [round(a, 2) for a in act]
    out["rss_hwm_mb"] = [round(r["rss_hwm_mb"], 1) for r in ranks]
    out["rss_growth_mb"] = [round(r["rss_hwm_mb"] - r["rss_start_mb"], 1) for r in ranks]
    out["setup_s"] = round(max(r["setup_s"] for r in ranks), 2)
    out["layout_s"] = round(max(r["layout_s"] for r in ranks), 2)
    pp, m = lay["pp"], lay["microbatches"]
    if pp > 1:
        plane = lay["dp"] * lay["tp"]
        pipelines = [[p + s * plane for s in range(pp)] for p in range(plane)]
        bubbles, busy_wall, busy_cpu, spans = [], [[] for _ in ranks], [[] for _ in ranks], []
        for i in range(steps):
            per_pipe = []
            for members in pipelines:
                recs = [ranks[r]["pipe"][i] for r in members]
                span = max(x["span"][1] for x in recs) - min(x["span"][0] for x in recs)
                spans.append(span)
                busy = [x["fwd"][0] + x["bwd"][0] + x["loss"][0] for x in recs]
                per_pipe.append(1 - statistics.mean(busy) / span)
            bubbles.append(statistics.mean(per_pipe))
            for r, rk in enumerate(ranks):
                x = rk["pipe"][i]
                busy_wall[r].append((x["fwd"][0] + x["bwd"][0] + x["loss"][0]) * 1e3)
                busy_cpu[r].append((x["fwd"][1] + x["bwd"][1] + x["loss"][1]) * 1e3)
        theory = (pp - 1) / (lay["virtual_stages"] * m + pp - 1)  # interleaving shrinks the bubble v times
        out["bubble"] = round(statistics.median(bubbles), 4)
        out["theoretical_bubble"] = round(theory, 4)
        out["bubble_ratio"] = round(out["bubble"] / theory, 3)
        out["schedule_span_ms"] = round(statistics.median(spans) * 1e3, 2)
        out["busy_ms_by_rank"] = [round(statistics.median(b), 2) for b in busy_wall]
        out["busy_cpu_ms_by_rank"] = [round(statistics.median(b), 2) for b in busy_cpu]
        out["chunks_by_rank"] = [[rk["pipe"][0][k][2] for k in ("fwd", "bwd")] for rk in ranks]
    return out


def fmt_list(xs, spec: str = ".0f") -> str:
    return "/".join(format(x, spec) for x in xs)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'layout':<22} {'step ms':>8} {'tok/s':>7}  {'peak MB per rank':<23} {'state MB':<23} "
          f"{'act MB':<19} {'bubble':>6} {'theory':>6} {'ratio':>5}")
    for r in rows:
        bub = (f"{r['bubble']:>6.3f} {r['theoretical_bubble']:>6.3f} {r['bubble_ratio']:>5.2f}"
               if r["pp"] > 1 else f"{'-':>6} {'-':>6} {'-':>5}")
        print(f"{r['name']:<22} {r['step_ms']:>8.1f} {r['tokens_per_s']:>7.0f}  {fmt_list(r['peak_mem_mb'], '.1f'):<23} "
              f"{fmt_list(r['state_mb'], '.1f'):<23} {fmt_list(r['act_mb'], '.1f'):<19} {bub}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 warm-up, 5 timed, 1 memory step; no GPipe")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps with activation tracking (not timed)")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--no-gpipe", action="store_true", help="pp > 1 layouts with 1F1B only")
    ap.add_argument("--only", default=None, help="regex: run only layouts whose name matches")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per spawn")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.mem_steps, args.no_gpipe = 5, 1, True
    lays = layouts(args.microbatches, not args.no_gpipe)
    if args.only:
        lays = [lay for lay in lays if re.search(args.only, lay["name"])]
    for i, lay in enumerate(lays):
        lay["index"] = i
    torch.set_num_threads(THREADS)
    load0, psi0 = os.getloadavg()[0], cpu_pressure()
    cfg = dict(MODEL, **MOE)
    print(f"Layouts of {WORLD} gloo ranks, {THREADS} thread each, CPU fp32, {os.cpu_count()} cores, not pinned; "
          f"GPT-MoE {cfg['n_layers']} layers d_model {cfg['d_model']} heads {cfg['n_heads']}, every layer MoE "
          f"E={cfg['num_experts']} top-{cfg['top_k']} expert hidden {4 * cfg['d_model']}, vocab {cfg['vocab_size']}, "
          f"seq {cfg['seq_len']}, global batch {GLOBAL_BATCH}; {args.warmup} warm-up + {args.steps} timed + "
          f"{args.mem_steps} memory steps per layout; {len(lays)} layouts; load avg {load0:.2f}, CPU pressure avg10 "
          f"{psi0}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(0, cfg["vocab_size"], size=1 << 17, dtype=np.uint16).tofile(corpus)
        out = Path(tmp) / "out"
        out.mkdir()
        run_cfg = dict(corpus=str(corpus), out=str(out), warmup=args.warmup, steps=args.steps,
                       mem_steps=args.mem_steps)
        results, failed = run_all(lays, run_cfg, args.timeout)
    wall = time.perf_counter() - t0
    rows = [summarize(results[i], run_cfg) for i in sorted(results)]
    print_table(rows)
    print("\ncolumns: step ms = median over timed steps of the slowest rank's step; tok/s = 1024 tokens / step; peak "
          "MB = state + act per rank (rank 0/1/2/3; ranks are (pp, dp, tp) with tp fastest); state = params + grads + "
          "AdamW state; act = peak bytes saved for backward; bubble = 1 - stage busy / schedule span (median step); "
          "theory = (pp-1)/(m+pp-1); ratio = bubble / theory")
    pipe = [r for r in rows if r["pp"] > 1]
    if pipe:
        print("\npipeline detail: schedule span ms, busy ms per rank (wall / thread CPU), rss peak MB per rank")
        for r in pipe:
            print(f"  {r['name']:<22} span {r['schedule_span_ms']:>7.1f}  busy {fmt_list(r['busy_ms_by_rank'], '.1f')}"
                  f"  cpu {fmt_list(r['busy_cpu_ms_by_rank'], '.1f')}  rss {fmt_list(r['rss_hwm_mb'])}")
    for name, err in failed.items():
        print(f"\nFAILED {name}:\n{err}")
    summary = {
        "bench": "layouts",
        "world": WORLD, "threads_per_process": THREADS, "backend": "gloo", "device": "cpu", "dtype": "float32",
        "cores": os.cpu_count(),
        "model": dict(MODEL, moe=MOE, expert_hidden=4 * MODEL["d_model"], global_batch=GLOBAL_BATCH),
        "optimizer": "AdamW lr 1e-3 (warmup 2), gradient clip 1.0",
        "warmup_steps": args.warmup, "timed_steps": args.steps, "memory_steps": args.mem_steps,
        "microbatches": args.microbatches,
        "definitions": {
            "step_ms": "median over timed steps of the slowest rank's on_train_batch_start..end wall time",
            "peak_mem_mb": "per rank: params + grads + AdamW state + peak bytes of tensors saved for backward "
                           "(saved_tensors_hooks, storages counted once, parameters excluded)",
            "rss_hwm_mb": "per rank: process VmHWM over the layout's fit (reset at on_train_start)",
            "bubble": "1 - mean stage busy (forward_one_chunk + backward_one_chunk + loss) / schedule span per "
                      "pipeline; median over timed steps",
            "theoretical_bubble": "(pp-1)/(virtual_stages*microbatches+pp-1)",
        },
        "layouts": rows,
        "failed": failed,
        "load_avg_start": round(load0, 2), "load_avg_end": round(os.getloadavg()[0], 2),
        "cpu_pressure_avg10_start": psi0, "cpu_pressure_avg10_end": cpu_pressure(),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
