"""Our LlamaMoE parameter names <-> Hugging Face tensor names, and reading a rank's share of a Hugging Face
checkpoint lazily (safetensors `safe_open` slices: each rank reads only the rows and experts it keeps).

Experts on disk are per expert (`experts.{j}.gate_proj/up_proj/down_proj.weight`, Mixtral's `w1/w3/w2`, each
[out, in]) or fused as transformers 5 holds them (`experts.gate_up_proj` [E, 2 hidden, d] with the gate rows first,
`experts.down_proj` [E, d, hidden]); ours are stacks w1 (gate), w3 (up) [E, d, hidden] and w2 [E, hidden, d].
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lightning_smartmoe import init
from lightning_smartmoe.errors import ConfigError
from lightning_smartmoe.interop import hf_config
from lightning_smartmoe.moe import GroupedExperts

TOP = {"tok_emb.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
NORMS = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
ATTENTION = {"kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "q_a_norm": "q_a_layernorm"}
EXPERT_PARTS = ("w1", "w3", "w2")  # gate, up, down


@dataclass(frozen=True)
class Location:
    """Where one of our tensors (one expert's, for an expert stack) is in a Hugging Face checkpoint: tensor `name`,
    indexed first by `lead` (the expert of a fused stack); `up_half`: past the gate rows of gate_up_proj;
    `transposed`: stored [out, in] where ours is [in, out]."""

    name: str
    lead: tuple[int, ...] = ()
    up_half: bool = False
    transposed: bool = False

    def shape(self, ours: tuple[int, ...], num_experts: int) -> tuple[int, ...]:
        """The Hugging Face tensor's shape for our (per-expert) logical shape `ours`."""
        shape = tuple(reversed(ours)) if self.transposed else ours
        if not self.lead:
            return shape
        return (num_experts, 2 * shape[0], shape[1]) if self.name.endswith("gate_up_proj") else (num_experts, *shape)


class Names:
    """The Hugging Face names of a model type's tensors, per-expert (`fused` False) or fused experts."""

    def __init__(self, model_type: str, fused: bool) -> None:
        mixtral = model_type == "mixtral"
        self.moe = "block_sparse_moe" if mixtral and not fused else "mlp"
        self.expert = EXPERT_PARTS if mixtral else ("gate_proj", "up_proj", "down_proj")
        self.shared = {"qwen2_moe": "shared_expert", "deepseek_v2": "shared_experts"}.get(model_type)
        self.fused = fused

    def locate(self, name: str, expert: int | None) -> Location:
        """The Location of our tensor `name` (of LlamaMoE; expert `expert` of an expert stack)."""
        if name in TOP:
            return Location(TOP[name])
        _, i, kind, *rest = name.split(".")
        layer = f"model.layers.{i}"
        if kind in NORMS:
            return Location(f"{layer}.{NORMS[kind]}.weight")
        if kind == "attn":
            return Location(f"{layer}.self_attn.{ATTENTION.get(rest[0], rest[0])}.{rest[1]}")
        module, *rest = rest
        if module == "router":
            return Location(f"{layer}.{self.moe}.gate.weight")
        if module == "shared":
            return Location(f"{layer}.mlp.{self.shared}.{rest[0]}.{rest[1]}")
        if module == "shared_gate":
            return Location(f"{layer}.mlp.shared_expert_gate.weight")
        if module == "experts":
            part = EXPERT_PARTS.index(rest[0])
            if self.fused:
                fused = "down_proj" if part == 2 else "gate_up_proj"
                return Location(f"{layer}.mlp.experts.{fused}", (expert,), up_half=part == 1, transposed=True)
            return Location(f"{layer}.{self.moe}.experts.{expert}.{self.expert[part]}.weight", transposed=True)
        return Location(f"{layer}.mlp.{module}.{rest[0]}")  # a dense SwiGLU layer


def tensor_files(directory: Path) -> dict[str, Path]:
    """Hugging Face tensor name -> the safetensors file holding it (reads the index or the files' headers only)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.init_from=hf:{directory}: no *.safetensors files there")
    out = {}
    for path in files:
        with safe_open(path, "pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


class WeightsSource:
    """The weights of a Hugging Face checkpoint folder for a LlamaMoE built from its config.json (hf_config).

    Construction checks, reading headers only, that the folder holds exactly the tensors `model` needs, each of the
    right shape (ConfigError naming the first that is missing, misshapen or unused). `load` then fills a rank's
    share of the model (after the strategy cut it; the whole model in one process).
    """

    def __init__(self, directory: str | Path, model: nn.Module) -> None:
        self.directory = Path(directory)
        hf = hf_config.read(self.directory)
        self.files = tensor_files(self.directory)
        self.names = Names(hf["model_type"], any(k.endswith("experts.gate_up_proj") for k in self.files))
        self._check(model)

    def _check(self, model: nn.Module) -> None:
        experts = {id(p): m.num_slots for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
        used = set()
        for name, p in model.named_parameters():
            num = experts.get(id(p))
            ours = tuple(p.shape[1:]) if num else tuple(p.shape)
            for expert in range(num) if num else [None]:
                loc = self.names.locate(name, expert)
                if loc.name not in self.files:
                    raise ConfigError(f"{self.directory}: tensor {loc.name} is missing (for our {name})")
                if loc.name not in used:
                    with safe_open(self.files[loc.name], "pt") as f:
                        found = tuple(f.get_slice(loc.name).get_shape())
                    want = loc.shape(ours, num or 0)
                    if found != want:
                        raise ConfigError(f"{self.directory}: tensor {loc.name} has shape {list(found)}, config.json "
                                          f"implies {list(want)} (for our {name})")
                used.add(loc.name)
        if getattr(model, "lm_head", True) is None:
            used.add(TOP["lm_head.weight"])  # a tied head: a copy of the embedding may be saved, or not
        unused = sorted(set(self.files) - used)
        if unused:
            raise ConfigError(f"{self.directory}: tensor {unused[0]} is not used by the model config.json describes "
                              f"({len(unused)} such tensors)")

    def values(self, name: str, expert: int | None, shape: tuple[int, ...], region: tuple[slice, ...]) -> Tensor:
        """init.Values: `region` of our logical tensor `name` (expert `expert`'s), read from its file."""
        loc = self.names.locate(name, expert)
        rows, *cols = reversed(region) if loc.transposed else region
        if loc.up_half:
            rows = slice(rows.start + shape[1], rows.stop + shape[1])
        with safe_open(self.files[loc.name], "pt") as f:
            part = f.get_slice(loc.name)[(*loc.lead, rows, *cols)]
        return part.T if loc.transposed else part

    def load(self, model: nn.Module, tp_rank: int = 0, tp_size: int = 1) -> None:
        """Fill this rank's share of `model` (its parameters; buffers such as the expert bias keep their values)."""
        init.load_(model, self.values, tp_rank, tp_size)


def export_tensors(model: nn.Module, model_type: str) -> dict[str, Tensor]:
    """Hugging Face name -> tensor (per-expert layout, as transformers writes) of a whole LlamaMoE in one process."""
    names = Names(model_type, fused=False)
    experts = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    out = {}
    for name, p in model.named_parameters():
        for expert in range(p.shape[0]) if id(p) in experts else [None]:
            t = p.detach() if expert is None else p.detach()[expert]
            loc = names.locate(name, expert)
            out[loc.name] = (t.T if loc.transposed else t).contiguous()
    return out
