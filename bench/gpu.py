"""One GPU, one command: check every kernel and measure the MoE hot path and a short training run.

Sections, each in a child process with its own timeout (a section that hangs, crashes or lacks what it needs is
reported as such and the others still run; what a section finished before a timeout is kept):
  kernels    tests/kernel_cases.py on CUDA: every Triton kernel against its torch reference, values and
             gradients, fp32 and bf16, and MoELayer under MOE_KERNELS=triton against MOE_KERNELS=torch.
  layer      MoE layer forward + backward, bf16 weights and activations, at the SmartMoE recipe shapes (d 1536 /
             2048 / 2560 with 64 / 32 / 16 experts, expert hidden 2d, top-2, 8192 and 16384 tokens), uniform and
             skewed routing, for: ours with the default kernel choice, ours with MOE_KERNELS=triton, ours with
             MOE_KERNELS=torch, a torchtitan-style layer on F.grouped_mm, the Hugging Face masked per-expert loop
             (bench/moe_layer.py's), and a dense GELU FFN with the same active FLOPs (hidden = 2 x expert hidden).
             All share the weights and see the same tokens; routing is skewed by shifting the tokens along one
             direction that the router weights of low-numbered experts favour (the realised max/mean expert load
             is reported). Figures: median ms of 5 steps after 2, tokens/s, TFLOPS of the expert (or dense) GEMMs
             (12 * T * k * d * h per step). GPU targets (issue 13): ours >= 0.7 x dense throughput, >= 1.0 x the
             F.grouped_mm layer, >= 3 x the HF loop.
  train      50 steps of recipe gpt_moe_small on one GPU (stdlib corpus): tokens/s over steps 10-50, MFU from
             6 x active parameters + attention FLOPs per token against the GPU's dense bf16 peak, peak memory.
  placement  bench/placement_paired.py needs 2 gloo ranks on CPU cores (its WORLD = 2): skipped, with the reason.

    python bench/gpu.py            (one H100/H200: at most 8 minutes)
    python bench/gpu.py --check    (CPU smoke version, under a minute: a few kernel cases in Triton's interpreter,
                                    the layer section at toy shapes in fp32 without Triton, 3 steps of gpt_moe_tiny)

The last line printed is one JSON object with every section's figures and status.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

TIMEOUTS = {"kernels": 100, "layer": 210, "train": 150, "placement": 10}  # seconds; sum 470 < 8 minutes
CHECK_TIMEOUTS = {"kernels": 30, "layer": 25, "train": 45, "placement": 10}
CHECK_KERNEL_CASES = ["router_fp32_k3_renorm", "histogram", "permute_bf16", "unpermute_fp32", "grouped_mm_bf16",
                      "layer_gshard_capacity_fp32"]
RECIPE_SHAPES = [(1536, 64), (2048, 32), (2560, 16)]  # (d_model, experts) of recipes/smartmoe_gpt_*; hidden 2d
CHECK_SHAPES = [(64, 8)]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity
TARGETS = {"vs_dense_min": 0.7, "vs_grouped_mm_min": 1.0, "vs_hf_loop_min": 3.0}
RESULT = "RESULT "


def emit(key: str, value) -> None:
    """A finished item of a section: the parent keeps it even if the section later times out."""
    print(RESULT + json.dumps({key: value}), flush=True)


# ----------------------------------------------------------------------------------------------- kernels
def section_kernels(check: bool) -> None:
    import torch

    import kernel_cases

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not check:
        emit("skipped", "no CUDA device")
        return
    for name in CHECK_KERNEL_CASES if check else list(kernel_cases.CASES):
        emit(name, kernel_cases.run(device, [name])[name])


# ------------------------------------------------------------------------------------------------- layer
def grouped_mm_layer(ours):
    """The torchtitan pattern on F.grouped_mm, with `ours`' weights: softmax top-k router, argsort by expert, two
    grouped GEMMs over int32 offsets, index_add back; the same load-balancing loss."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GroupedMMMoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_experts, self.top_k, self.coeff = ours.cfg.num_experts, ours.cfg.top_k, ours.cfg.aux_loss_coeff
            self.gate = nn.Parameter(ours.router.weight.detach().clone())
            self.w1 = nn.Parameter(ours.experts.w1.detach().clone())
            self.w2 = nn.Parameter(ours.experts.w2.detach().clone())

        def forward(self, x):
            b, s, d = x.shape
            hidden = x.reshape(-1, d)
            probs = torch.softmax(F.linear(hidden.float(), self.gate.float()), dim=-1)
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            flat = ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
            offs = counts.cumsum(0).to(torch.int32)
            rows = hidden.index_select(0, order // self.top_k)
            y = F.grouped_mm(F.gelu(F.grouped_mm(rows, self.w1, offs=offs)), self.w2, offs=offs)
            y = y * weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
            out = torch.zeros_like(hidden).index_add(0, order // self.top_k, y)
            f = counts.to(probs.dtype) / flat.numel()
            return out.reshape(b, s, d), self.coeff * self.num_experts * torch.dot(f, probs.mean(0))

    return GroupedMMMoE()


def skew_tokens(x, router_weight, skewed: bool):
    """Uniform: x unchanged. Skewed: shift x along a random unit direction u and add u * 3 (1 - e / (E - 1)) to
    expert e's router row, so logits of low-numbered experts are raised by up to 3."""
    import torch

    if not skewed:
        return x
    num_experts, d = router_weight.shape
    u = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(3)), dim=0).to(x.device)
    with torch.no_grad():
        lift = 3.0 * (1 - torch.arange(num_experts, device=x.device) / max(num_experts - 1, 1))
        router_weight.add_(lift[:, None].to(router_weight.dtype) * u.to(router_weight.dtype))
    return x + u.to(x.dtype)


def timed(model, x, gy, steps: int, warmup: int) -> float:
    """Median seconds of forward + backward (weights' and input's gradients, the aux loss included)."""
    from moe_layer import step

    times = [step(model, x, gy) for _ in range(warmup + steps)]
    return statistics.median(times[warmup:])


def section_layer(check: bool) -> None:
    import torch

    from lightning_smartmoe.moe import MoEConfig, MoELayer
    from moe_layer import DenseFFN, LoopMoE
    from triton_ops import backend, expert_histogram

    cuda = torch.cuda.is_available()
    if not cuda and not check:
        emit("skipped", "no CUDA device")
        return
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = RECIPE_SHAPES if cuda else CHECK_SHAPES
    token_counts = (8192, 16384) if cuda else (256,)
    steps, warmup = (5, 2) if cuda else (2, 1)
    ours_modes = {"ours": None, "ours_triton": "triton", "ours_torch": "torch"} if cuda else {"ours_torch": "torch"}
    for d, num_experts in shapes:
        h, k = 2 * d, 2
        for tokens in token_counts:
            for skewed in (False, True):
                name = f"d{d}_e{num_experts}_t{tokens}_{'skewed' if skewed else 'uniform'}"
                torch.manual_seed(0)
                cfg = MoEConfig(num_experts=num_experts, top_k=k, gate="naive", capacity_factor=None)
                ours = MoELayer(d, h, cfg)
                gen = torch.Generator().manual_seed(1)
                x = torch.randn(tokens // 256, 256, d, generator=gen).to(device)
                x = skew_tokens(x, ours.router.weight.data, skewed).to(dtype).requires_grad_(True)
                gy = torch.randn(x.shape, generator=gen).to(device, dtype)
                loop = LoopMoE(d, h, num_experts, k, cfg.aux_loss_coeff)
                loop.copy_from(ours)
                ours = ours.to(device, dtype)
                models = {"grouped_mm": grouped_mm_layer(ours), "hf_loop": loop.to(device, dtype),
                          "dense": DenseFFN(d, k * h).to(device, dtype)}
                with torch.no_grad():
                    load = expert_histogram(ours.router(x).expert_ids, num_experts)[0].double()
                result = {"max_over_mean_load": round(float(load.max() / load.mean()), 3)}
                outputs = {}
                for mode, kernels in ours_modes.items():
                    if kernels is None:
                        os.environ.pop("MOE_KERNELS", None)
                    else:
                        os.environ["MOE_KERNELS"] = kernels
                    with torch.no_grad():
                        outputs[mode] = ours(x)[0].float()
                    result[mode] = {"ms": timed(ours, x, gy, steps, warmup) * 1e3}
                os.environ.pop("MOE_KERNELS", None)
                for mode, model in models.items():
                    if mode != "dense":
                        with torch.no_grad():
                            outputs[mode] = model(x)[0].float()
                    result[mode] = {"ms": timed(model, x, gy, steps, warmup) * 1e3}
                flops = 12 * tokens * k * d * h
                for mode in list(ours_modes) + list(models):
                    ms = result[mode]["ms"]
                    result[mode] = {"ms": round(ms, 3), "tokens_per_s": round(tokens / ms * 1e3),
                                    "tflops": round(flops / ms / 1e9, 2)}
                scale = outputs["hf_loop"].abs().max().item()
                result["max_abs_diff_vs_hf_loop"] = {m: round((o - outputs["hf_loop"]).abs().max().item(), 5)
                                                     for m, o in outputs.items() if m != "hf_loop"}
                result["hf_loop_max_abs"] = round(scale, 5)
                best = min(result[m]["ms"] for m in ours_modes)
                result["ours_vs"] = {"dense": round(result["dense"]["ms"] / best, 3),
                                     "grouped_mm": round(result["grouped_mm"]["ms"] / best, 3),
                                     "hf_loop": round(result["hf_loop"]["ms"] / best, 3)}
                result["targets_met"] = {"vs_dense": result["ours_vs"]["dense"] >= TARGETS["vs_dense_min"],
                                         "vs_grouped_mm": result["ours_vs"]["grouped_mm"] >= TARGETS["vs_grouped_mm_min"],
                                         "vs_hf_loop": result["ours_vs"]["hf_loop"] >= TARGETS["vs_hf_loop_min"]}
                emit(name, result)
                del ours, loop, models, x, gy, outputs
                if cuda:
                    torch.cuda.empty_cache()
    emit("measured_kernel_choices", {" ".join(map(str, key)): v for key, v in backend.chosen().items()})


# ------------------------------------------------------------------------------------------------- train
def section_train(check: bool) -> None:
    import lightning.pytorch as pl
    import torch
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_smartmoe import config
    from lightning_smartmoe.moe import GroupedExperts
    from lightning_smartmoe.train import build

    cuda = torch.cuda.is_available()
    if not cuda and not check:
        emit("skipped", "no CUDA device")
        return
    steps, first_timed = (50, 10) if cuda else (3, 1)
    overrides = [f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", "+trainer.num_sanity_val_steps=0",
                 "+trainer.enable_model_summary=false", "trainer.log_every_n_steps=1000"]
    overrides += ["recipe=gpt_moe_small", "trainer.devices=1"] if cuda else ["recipe=gpt_moe_tiny"]
    config.register_recipes()
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides + ["logger=csv"])

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())
            self.tokens = batch[0].numel()

    with tempfile.TemporaryDirectory() as out:
        cfg.logger.csv.save_dir = out
        trainer, module, dm, _ = build(cfg, Path(out))  # a fresh run: nothing to resume
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]  # no 2 GB save
        clock = StepClock()
        trainer.callbacks.append(clock)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.fit(module, dm)
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
    starts = clock.starts + [end]
    timed_s = starts[-1] - starts[first_timed]
    tokens_per_s = clock.tokens * (len(starts) - 1 - first_timed) / timed_s
    model = module.model
    mcfg = model.cfg
    expert_params = sum(m.w1.numel() + m.w2.numel() for m in model.modules() if isinstance(m, GroupedExperts))
    embeddings = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    active = sum(p.numel() for p in model.parameters()) - embeddings - expert_params
    active += expert_params * mcfg.moe.top_k // mcfg.moe.num_experts
    flops_per_token = 6 * active + 12 * mcfg.n_layers * mcfg.d_model * mcfg.seq_len
    result = {"recipe": "gpt_moe_small" if cuda else "gpt_moe_tiny", "steps": steps, "timed_steps": f"{first_timed}-{steps}",
              "tokens_per_s": round(tokens_per_s), "fit_s": round(end - t0, 1), "active_params": active,
              "flops_per_token": flops_per_token}
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result["device"] = name
        result["mfu"] = round(flops_per_token * tokens_per_s / (peak * 1e12), 4) if peak else None
        result["mfu_peak_tflops"] = peak
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    emit("train", result)


# --------------------------------------------------------------------------------------------- placement
def section_placement(check: bool) -> None:
    emit("skipped", "bench/placement_paired.py runs WORLD = 2 gloo ranks pinned to CPU cores; with one GPU there is no "
                    "second rank to place experts on")


SECTIONS = {"kernels": section_kernels, "layer": section_layer, "train": section_train, "placement": section_placement}


def run_section(name: str, check: bool, timeout: float) -> dict:
    """Run one section in a child process; its RESULT lines, status and wall time."""
    env = dict(os.environ)
    env.pop("MOE_KERNELS", None)
    if check and name == "kernels":
        env["TRITON_INTERPRET"] = "1"  # no GPU: the kernels run in the interpreter (set before triton is imported)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name] + (["--check"] if check else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        status = f"timed out after {timeout} s"
    items = {}
    for line in out.splitlines():
        if line.startswith(RESULT):
            items.update(json.loads(line[len(RESULT):]))
    section = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "results": items}
    if status != "ok":
        section["stderr_tail"] = err[-2000:]
    return section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="CPU smoke version, under a minute")
    ap.add_argument("--section", choices=list(SECTIONS), help="run one section in this process (used internally)")
    args = ap.parse_args()
    if args.section:
        SECTIONS[args.section](args.check)
        return
    import torch

    t0 = time.perf_counter()
    timeouts = CHECK_TIMEOUTS if args.check else TIMEOUTS
    summary = {"bench": "gpu", "check": args.check, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "targets": TARGETS,
               "sections": {}}
    try:
        import triton

        summary["triton"] = triton.__version__
    except ImportError:
        summary["triton"] = None
    for name in SECTIONS:
        section = run_section(name, args.check, timeouts[name])
        summary["sections"][name] = section
        print(f"{name}: {section['status']} in {section['seconds']} s", flush=True)
        for key, value in section["results"].items():
            print(f"  {key}: {json.dumps(value)}", flush=True)
    kernels = summary["sections"]["kernels"]["results"]
    summary["kernels_all_ok"] = all(v.get("ok") for v in kernels.values() if isinstance(v, dict)) if kernels else None
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary))
    if any(section["status"] != "ok" for section in summary["sections"].values()):
        sys.exit(1)  # after the figures, so a failed section loses none of the others'


if __name__ == "__main__":
    main()
