"""Hugging Face import: tiny random transformers models of each supported architecture, built offline and saved
as safetensors (per-expert tensors, as transformers writes them; one with the fused gate_up_proj layout too), give
our LlamaMoE the same logits within 1e-5 in fp32, in one process and at ep=2 and tp=2 under the strategy (each
rank reading its share). Bad checkpoints are refused naming the tensor or field."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

transformers = pytest.importorskip("transformers")

from distributed import run_distributed  # noqa: E402
from lightning_smartmoe import ConfigError, SmartMoEStrategy  # noqa: E402
from lightning_smartmoe.interop import from_hf  # noqa: E402

VOCAB, SEQ = 64, 16
TOL = 1e-5
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, initializer_range=0.1)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**SHAPE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=24,
                                                     shared_expert_intermediate_size=40, num_experts=4,
                                                     num_experts_per_tok=2, decoder_sparse_step=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                                     num_experts_per_tok=2, head_dim=8, norm_topk_prob=True,
                                                     tie_word_embeddings=True),
    "olmoe": lambda: transformers.OlmoeConfig(**SHAPE, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                              pad_token_id=0, eos_token_id=1),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **{**SHAPE, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    "deepseek_v2_yarn_q_lora": lambda: transformers.DeepseekV2Config(  # DeepSeek-V2's YaRN positions, query latent
        **{**SHAPE, "num_key_value_heads": 4, "max_position_embeddings": 32}, intermediate_size=48,
        moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
                         "mscale": 0.707, "mscale_all_dim": 0.707}),
}
ARCHS = [*CONFIGS, "mixtral_fused"]


def save_fused(model, directory: Path) -> None:
    """The model's in-memory state dict (transformers 5's fused experts) as one safetensors file + config.json."""
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    model.config.to_json_file(directory / "config.json")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for arch, config in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config())
        model.save_pretrained(root / arch)
        dirs[arch] = root / arch
        if arch == "mixtral":
            save_fused(model, root / "mixtral_fused")
            dirs["mixtral_fused"] = root / "mixtral_fused"
    return dirs


def reference_logits(directory: Path, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx).logits


def tokens(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_in_one_process(hf_dirs, arch):
    idx = tokens(2)
    model = from_hf(hf_dirs[arch]).eval()
    assert sum(p.numel() for p in model.parameters()) > 0
    with torch.no_grad():
        logits, _ = model(idx)
    err = float((logits - reference_logits(hf_dirs[arch], idx)).abs().max())
    assert err <= TOL, f"{arch}: max logit difference {err:.2e}"


class Logits(pl.LightningModule):
    """Builds from_hf(directory) in configure_model (on the meta device under the strategy) and records, per
    validation batch, the largest difference between this rank's logits (its vocab shard under tp) and
    transformers'."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory, self.model, self.errors = directory, None, []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = from_hf(self.directory)

    def validation_step(self, batch, batch_idx) -> None:
        (idx,) = batch
        logits, _ = self.model(idx)
        strategy = self.trainer.strategy
        tp_rank = torch.distributed.get_rank(strategy.layout.tp_group) if strategy.sizes.tp > 1 else 0
        n = logits.shape[-1]
        want = reference_logits(self.directory, idx)[..., tp_rank * n : (tp_rank + 1) * n]
        self.errors.append(float((logits - want).abs().max()))


def _distributed(dirs: dict[str, str]) -> dict[str, list[float]]:
    out = {}
    for arch, directory in dirs.items():
        for name, strategy in (("ep2", lambda: SmartMoEStrategy(ep=2)), ("tp2", lambda: SmartMoEStrategy(tp=2))):
            module = Logits(Path(directory))
            trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy(), precision="32-true", logger=False,
                                 enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
            trainer.validate(module, DataLoader(TensorDataset(tokens(4)), batch_size=1), verbose=False)
            out[f"{arch}_{name}"] = module.errors
    return out


@pytest.fixture(scope="module")
def distributed(hf_dirs):
    return run_distributed(2, _distributed, {a: str(d) for a, d in hf_dirs.items()}, timeout=400)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("layout", ["ep2", "tp2"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_under_the_strategy(distributed, arch, layout):
    batches = 2 if layout == "ep2" else 4  # 4 sequences over the data-parallel ranks
    for rank, result in enumerate(distributed):
        errors = result[f"{arch}_{layout}"]
        assert len(errors) == batches and max(errors) <= TOL, f"rank {rank}: {errors}"


def _damaged(hf_dirs, tmp_path: Path, edit) -> Path:
    """A copy of the qwen3_moe checkpoint with `edit(tensors, config)` applied."""
    from safetensors.torch import load_file

    src = hf_dirs["qwen3_moe"]
    tensors = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    edit(tensors, config)
    out = tmp_path / "damaged"
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("edit,message", [
    (lambda t, c: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"), "tensor model.layers.1.mlp.experts.3.up_proj.weight is missing"),
    (lambda t, c: t.update({"model.norm.weight": torch.ones(31)}), "tensor model.norm.weight has shape [31]"),
    (lambda t, c: t.update({"model.extra.weight": torch.ones(3)}), "tensor model.extra.weight is not used"),
    (lambda t, c: c.update(model_type="gpt2"), "model_type='gpt2' is not supported"),
    (lambda t, c: c.update(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (lambda t, c: c.update(mlp_only_layers=[0]), "mlp_only_layers=[0] is not supported"),
])
def test_bad_checkpoints_are_refused_naming_the_tensor_or_field(hf_dirs, tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_hf(_damaged(hf_dirs, tmp_path, edit))


@pytest.mark.parametrize("recipe,model_type,params", [
    ("olmoe_1b_7b", "olmoe", 6_919_161_856),
    ("qwen3_30b_a3b", "qwen3_moe", 30_532_122_624),
    ("mixtral_8x7b", "mixtral", 46_702_792_704),
])
def test_recipes_have_the_shapes_of_the_released_models(recipe, model_type, params):
    """Each shape recipe is the architecture it is named after, with the released model's parameter count."""
    from hydra import compose, initialize_config_dir

    from lightning_smartmoe import config
    from lightning_smartmoe.interop.hf_config import to_hf

    config.register_recipes()
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
        model = config.model_config(compose(config_name="train", overrides=[f"recipe={recipe}"]))
    assert to_hf(model)["model_type"] == model_type
    with torch.device("meta"):
        assert sum(p.numel() for p in model.build().parameters()) == params


def test_init_from_in_the_config_maps_the_checkpoint_and_checks_it_before_any_process(hf_dirs, tmp_path):
    """`model=llama_moe model.init_from=hf:DIR`: the architecture comes from DIR (training settings stay ours), and a
    damaged DIR is refused while the config is read, in the launching process."""
    from hydra import compose, initialize_config_dir

    from lightning_smartmoe import config

    def model_config(directory: Path):
        with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["model=llama_moe", f"model.init_from=hf:{directory}",
                                                          "model.seq_len=32", "moe.aux_loss_coeff=0.003"])
        return config.model_config(cfg)

    model = model_config(hf_dirs["qwen2_moe"])
    assert (model.vocab_size, model.n_kv_heads, model.qkv_bias, model.seq_len) == (VOCAB, 2, True, 32)
    assert (model.moe.num_experts, model.moe.every, model.moe.shared_expert_hidden, model.moe.renormalize) == (4, 2, 40, False)
    assert model.moe.aux_loss_coeff == 0.003
    damaged = _damaged(hf_dirs, tmp_path, lambda t, c: t.pop("model.layers.0.self_attn.q_norm.weight"))
    with pytest.raises(ConfigError, match="tensor model.layers.0.self_attn.q_norm.weight is missing"):
        model_config(damaged)
