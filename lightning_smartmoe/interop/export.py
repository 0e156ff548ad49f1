"""smartmoe-export: a LlamaMoE checkpoint of any layout and placement as a Hugging Face model folder.

    smartmoe-export ckpt_path=outputs/.../checkpoints/last.ckpt out=hf_model

The whole model is built in this process and reads every expert by its logical id (generate.load_model), so a
checkpoint saved under expert, tensor or pipeline parallelism, with replicas or migrated experts, exports alike.
Writes config.json (the architecture that computes what the model does: hf_config.to_hf) and safetensors shards
of at most `shard_mb` MB with per-expert tensor names (model.safetensors, or model-0000i-of-0000n.safetensors and
model.safetensors.index.json), which `transformers.AutoModelForCausalLM.from_pretrained(out)` loads.
"""

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from lightning_smartmoe.config import conf_dir
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.generate import load_model, quote_values
from lightning_smartmoe.interop import hf_config, hf_weights
from lightning_smartmoe.models.llama_moe import LlamaMoE


def shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """`tensors` in name order, cut into groups of at most max_bytes (a larger tensor gets a group of its own)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensors[name]
        size += n
    return groups


def export(ckpt_path: str | Path, out: str | Path, shard_mb: float = 2000) -> dict:
    """Write checkpoint `ckpt_path` (of a LlamaMoE) to folder `out` as a Hugging Face model; returns its config.json.
    ConfigError if the checkpoint holds another model, the model has no Hugging Face architecture, or `out` is a
    folder that is not empty."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out={str(out)!r} exists and is not an empty folder")
    model = load_model(str(ckpt_path), torch.device("cpu"))
    if not isinstance(model, LlamaMoE):
        raise ConfigError(f"ckpt_path={str(ckpt_path)!r} holds a {type(model).__name__}; export needs a model=llama_moe checkpoint")
    config = hf_config.to_hf(model.cfg)
    tensors = hf_weights.export_tensors(model, config["model_type"])
    dtypes = {t.dtype for t in tensors.values()}
    config["dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    groups = shards(tensors, int(shard_mb * 2**20))
    out.mkdir(parents=True, exist_ok=True)
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        save_file(group, out / name, metadata={"format": "pt"})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, group in zip(names, groups) for k in group}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return config


def run(cfg: DictConfig) -> None:
    try:
        if isinstance(cfg.shard_mb, bool) or not isinstance(cfg.shard_mb, int | float) or not cfg.shard_mb > 0:
            raise ConfigError(f"shard_mb={cfg.shard_mb!r} must be a number > 0")
        config = export(str(cfg.ckpt_path), str(cfg.out), cfg.shard_mb)
    except ConfigError as err:
        print(f"smartmoe-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"smartmoe-export: wrote {cfg.out} ({config['architectures'][0]})")


def main() -> None:
    sys.argv[1:] = quote_values(sys.argv[1:], ("ckpt_path", "out"))
    hydra.main(config_path=str(conf_dir()), config_name="export", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
