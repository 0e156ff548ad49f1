"""Peak memory per rank while importing a Hugging Face checkpoint, against the rank's share.

    .venv/bin/python bench/hf_import.py [--experts 64] [--layers 4]

Writes a Qwen3-MoE-style checkpoint of random weights (d_model 512, --layers layers of --experts SwiGLU experts of
hidden 1024, per-expert tensors, one safetensors file per layer: 1.6 GB with the defaults), then on 4 gloo ranks at
ep=4 builds `MoELMModule(hf_model_config(DIR))` under the strategy (meta device; each rank reads its experts and
the dense weights through safetensors slices) and measures, per rank, the peak resident set (VmHWM, reset through
/proc/self/clear_refs) from before the Trainer starts to the end of setup (the weights loaded, the optimizer
built), twice in one process: a tiny checkpoint of the same architecture (the baseline of interpreter, Lightning
and communication buffers), then the large one. Figure: (peak - baseline) / the rank's share (bytes of the
parameters it keeps). Target: <= 1.5. The last line printed is one JSON object.
"""

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # run_distributed
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed import run_distributed  # noqa: E402
from machine import reset_peak_rss  # noqa: E402
from memory import AtSetup, _trainer  # noqa: E402

from lightning_smartmoe import SmartMoEStrategy  # noqa: E402
from lightning_smartmoe.interop import hf_config, hf_model_config  # noqa: E402
from lightning_smartmoe.interop.hf_weights import Names  # noqa: E402
from lightning_smartmoe.models import LlamaMoEConfig, MoELMModule, OptimConfig  # noqa: E402
from lightning_smartmoe.moe import GroupedExperts, MoEConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

WORLD = 4
MIB = 2**20


def write_checkpoint(directory: Path, d_model: int, layers: int, experts: int, hidden: int) -> int:
    """A Qwen3-MoE folder of N(0, 0.02) weights, one safetensors file per layer (written one at a time); returns
    its bytes."""
    cfg = LlamaMoEConfig(vocab_size=256, seq_len=64, n_layers=layers, d_model=d_model, n_heads=8, n_kv_heads=4,
                         qk_norm="head", moe=MoEConfig(num_experts=experts, top_k=2, activation="swiglu",
                                                       expert_hidden=hidden))
    config = hf_config.to_hf(cfg)
    with torch.device("meta"):
        model = cfg.build()
    stacks = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    names, gen = Names(config["model_type"], fused=False), torch.Generator().manual_seed(0)
    directory.mkdir()
    groups: dict[str, dict[str, torch.Tensor]] = {}  # file -> its tensors; a file is written once the next begins
    for name, p in model.named_parameters():
        file = f"{'-'.join(name.split('.')[:2 if name.startswith('blocks.') else 1])}.safetensors"
        if file not in groups and groups:
            last = next(reversed(groups))
            save_file(groups[last], directory / last)
            groups[last] = {}
        group = groups.setdefault(file, {})
        for expert in range(p.shape[0]) if id(p) in stacks else [None]:
            loc = names.locate(name, expert)
            shape = loc.shape(tuple(p.shape[1:]) if expert is not None else tuple(p.shape), 0)
            group[loc.name] = torch.randn(shape, generator=gen) * 0.02
    last = next(reversed(groups))
    save_file(groups[last], directory / last)
    (directory / "config.json").write_text(json.dumps(config))
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def worker(corpus: str, tiny: str, large: str) -> dict:
    torch.set_num_threads(1)
    out = {"rank": dist.get_rank()}
    for name, directory in (("baseline", tiny), ("import", large)):
        reset_peak_rss()
        at = AtSetup()
        trainer, dm = _trainer(corpus, SmartMoEStrategy(ep=WORLD), at)
        trainer.fit(MoELMModule(hf_model_config(directory, LlamaMoEConfig(seq_len=64)), OptimConfig()), dm)
        out[name] = {"peak_mib": at.peak_mib, "share_mib": at.share / MIB}
        del trainer, dm
        gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "tokens.bin"
        np.random.default_rng(0).integers(0, 256, size=1 << 16, dtype=np.uint16).tofile(corpus)
        write_checkpoint(root / "tiny", d_model=16, layers=1, experts=WORLD, hidden=8)
        size = write_checkpoint(root / "large", d_model=512, layers=args.layers, experts=args.experts, hidden=1024)
        ranks = run_distributed(WORLD, worker, str(corpus), str(root / "tiny"), str(root / "large"), timeout=args.timeout)
    rows = [{"rank": r["rank"], "share_mib": round(r["import"]["share_mib"], 1),
             "peak_over_share": round((r["import"]["peak_mib"] - r["baseline"]["peak_mib"]) / r["import"]["share_mib"], 3)}
            for r in ranks]
    print(f"checkpoint {size / 1e9:.2f} GB, {WORLD} ranks, ep={WORLD}")
    print(f"{'rank':>4} {'share MiB':>10} {'peak/share':>11}")
    for row in rows:
        print(f"{row['rank']:>4} {row['share_mib']:>10} {row['peak_over_share']:>11}")
    print(json.dumps({"checkpoint_gb": round(size / 1e9, 3), "ranks": rows,
                      "target_met": all(row["peak_over_share"] <= 1.5 for row in rows)}))


if __name__ == "__main__":
    main()
