"""Each bad input gets one clear ConfigError naming the key, raised while building, before any training."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_smartmoe import ConfigError, config
from lightning_smartmoe.train import build

config.register_recipes()


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture
def odd_bin(tmp_path) -> Path:
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")
    return path


@pytest.fixture
def empty_file(tmp_path) -> Path:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["moe.top_k=9"], r"moe\.top_k=9 must be between 1 and moe\.num_experts=8"),
        (["moe.capacity_factor=0"], r"moe\.capacity_factor=0.* must be > 0"),
        (["moe.capacity_factor=-1.5"], r"moe\.capacity_factor=-1\.5 must be > 0"),
        (["model.d_model=130"], r"model\.d_model=130 must be divisible by model\.n_heads=4"),
        (["moe.gate=topk"], r"moe\.gate='topk' is unknown; allowed: naive, gshard, switch"),
        (["moe.gate=switch"], r"moe\.gate=switch routes to 1 expert"),
        (["data.path=/no/such/corpus"], r"data\.path='/no/such/corpus' does not exist"),
        (["+moe.experts=4"], r"moe\.experts is not a known key"),
        (["trainer.devices=3", "parallel.ep=2"], r"parallel\.ep=2 must divide parallel\.dp x parallel\.tp = 3 x 1 = 3"),
        (["trainer.devices=3", "parallel.ep=3"], r"moe\.num_experts=8 must be divisible by parallel\.ep=3"),
        (["trainer.devices=4", "parallel.dp=2"], r"world size 4 .* must equal parallel\.dp x parallel\.tp x parallel\.pp"),
        (["trainer.devices=4", "data.global_batch_size=6"], r"data\.global_batch_size=6 must be divisible"),
        (["trainer.devices=3", "parallel.tp=3"], r"model\.n_heads=4 must be divisible by parallel\.tp=3"),
        (["trainer.devices=2", "parallel.tp=2", "model.vocab_size=257"], r"model\.vocab_size=257 must be divisible by parallel\.tp=2"),
        (["trainer.devices=4", "parallel.tp=3"], r"world size 4 .* must be divisible by parallel\.tp x parallel\.pp = 3"),
        (["trainer.devices=2", "parallel.pp=2", "model.n_layers=3"], r"model\.n_layers=3 must be divisible by parallel\.pp x parallel\.virtual_stages = 2 x 1"),
        (["trainer.devices=2", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], r"interleaved_1f1b needs parallel\.virtual_stages >= 2"),
        (["trainer.devices=2", "parallel.pp=2", "parallel.microbatches=3"], r"data\.global_batch_size=\d+ must be divisible .* parallel\.microbatches=3"),
        (["parallel.microbatches=2"], r"parallel\.microbatches > 1 and parallel\.virtual_stages > 1 need parallel\.pp > 1"),
        (["trainer.devices=2", "parallel.pp=2"], r"parallel\.pp_schedule=1f1b needs parallel\.microbatches >= parallel\.pp=2 \(got 1\)"),
        (["trainer.devices=2", "parallel.tp=2", "parallel.expert_tp=true", "parallel.ep=2"],
         r"parallel\.ep=2 must divide parallel\.dp=1 with parallel\.expert_tp=true"),
        (["trainer.devices=2", "parallel.tp=2", "parallel.expert_tp=true", "moe.expert_hidden=255"],
         r"moe\.expert_hidden \(default model\.ffn_hidden\)=255 must be divisible by parallel\.tp=2"),
        (["trainer.devices=2", "parallel.pp=2", "parallel.pp_schedule=zb"], r"parallel\.pp_schedule='zb' is unknown; allowed: gpipe, 1f1b, interleaved_1f1b"),
        (["trainer.devices=4", "parallel.tp=2", "parallel.ep=3"], r"parallel\.ep=3 must divide parallel\.dp x parallel\.tp = 2 x 2 = 4"),
        (["trainer.devices=auto"], r"trainer\.devices='auto' must be an integer >= 1"),
        (["trainer.accumulate_grad_batches=0"], r"trainer\.accumulate_grad_batches=0 must be an integer >= 1"),
        (["parallel.start_method=fork"], r"parallel\.start_method='fork' is unknown; allowed: popen, spawn"),
        (["parallel.bucket_mb=0"], r"parallel\.bucket_mb=0 must be a number > 0"),
        (["placement.window=1.5"], r"placement\.window=1\.5 must be an integer >= 1"),
        (["placement.policy=lpt"], r"placement\.policy='lpt' is unknown"),
        (["placement.extra_slots=-1"], r"placement\.extra_slots=-1 must be an integer >= 0"),
        (["ckpt_path=/no/such/ckpt"], r"ckpt_path='/no/such/ckpt' is not a smartmoe checkpoint folder"),
    ],
)
def test_bad_config_values(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(compose_cfg(overrides), tmp_path)


def test_empty_corpus(tmp_path, empty_file):
    with pytest.raises(ConfigError, match=r"data\.path=.*the corpus is empty"):
        build(compose_cfg([f"data.path={empty_file}"]), tmp_path)


def test_odd_length_bin(tmp_path, odd_bin):
    with pytest.raises(ConfigError, match=r"data\.path: .*odd\.bin has 3 bytes; a uint16 \.bin token file must have an even length"):
        build(compose_cfg([f"data.path={odd_bin}"]), tmp_path)


def _cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_smartmoe.train", *overrides, f"hydra.run.dir={cwd}"],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )


@pytest.mark.timeout(150)
def test_cli_reports_config_error_and_exits_nonzero(tmp_path):
    result = _cli("moe.top_k=9", cwd=tmp_path)
    assert result.returncode == 2
    assert "smartmoe-train: error: moe.top_k=9 must be between 1 and moe.num_experts=8" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(150)
def test_cli_unknown_recipe(tmp_path):
    result = _cli("recipe=gpt_moe_huge", cwd=tmp_path)
    assert result.returncode != 0
    assert "recipe/gpt_moe_huge" in result.stderr and "gpt_moe_tiny" in result.stderr  # names the allowed ones


def test_empty_bin(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data\.path: .*empty\.bin is empty"):
        build(compose_cfg([f"data.path={tmp_path / 'empty.bin'}"]), tmp_path)
