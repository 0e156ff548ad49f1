"""Each bad input gets one clear ConfigError naming the key, raised while building, before any training."""

import importlib.util
import os
import shutil
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
        (["parallel.zero=3"], r"parallel\.zero=3 is unknown; allowed: 0, 1 .*, 2 .*; 3 \(parameters\) is not offered"),
        (["parallel.zero=true"], r"parallel\.zero=True is unknown"),
        (["model.recompute=attention"], r"model\.recompute='attention' is unknown; allowed: none, selective, full"),
        (["trainer.devices=2", "parallel.ep=2", "memory_gb=0.001"],
         r"memory_gb=0\.001: rank 0 \(pipeline stage 0\) is predicted to need 0\.\d+ GiB; its largest term is activations, 0\.\d+ GiB"),
        (["memory_gb=-1"], r"memory_gb=-1 must be a number > 0 \(GiB per rank\) or null"),
        (["+foo=1"], r"^foo is not a known key; allowed: callbacks, checkpoint_every_n_steps, ckpt_path, data, dry_run, hardware, logger, memory_gb, model, moe, optim, parallel, placement, plan, seed, trainer, workload$"),
        (["+placement.intervall=5"], r"^placement\.intervall is not a known key; allowed: calibrate, extra_slots, heatmap_every, interval, min_gain, policy, window$"),
        (["+data.seqlen=32"], r"^data\.seqlen is not a known key; allowed: global_batch_size, num_workers, path, seed, val_fraction$"),
        (["+parallel.timeout=5"], r"^parallel\.timeout is not a known key; allowed: .*timeout_s"),
        (["+placement.cost.flops=1"], r"^placement\.cost is not a known key; allowed: calibrate, extra_slots, "),
        (["+trainer.foo=1"], r"^trainer\.foo is not a known key; allowed: accelerator, accumulate_grad_batches, .*val_check_interval$"),
        (["+trainer.strategy=ddp"], r"^trainer\.strategy is set by smartmoe-train"),
        (["+trainer.gradient_clip_algorithm=bogus"], r"^trainer: .*gradient_clip_algorithm.*bogus"),
        (["placement.min_gain=abc"], r"^placement\.min_gain='abc' must be a number of seconds \(-inf: always switch\)$"),
        (["placement.calibrate=maybe"], r"^placement\.calibrate='maybe' must be true or false$"),
        (["hardware=h900"], r"^hardware='h900': no such file; give a built-in name \(h100, h200, a100\) or a smartmoe-profile file$"),
        (["hardware=5"], r"^hardware=5 must be h100, h200, a100 or a calibration file$"),
        (["trainer.precision=bogus"], r"^trainer\.precision='bogus' is unknown; allowed: 64, 32, 16, transformer-engine, .*bf16-mixed, 32-true, 64-true"),
        (["trainer.accelerator=gpu"], r"^trainer\.accelerator='gpu' cannot run here; allowed on this machine: auto, cpu$"),
        (["trainer.max_steps=-1"], r"^trainer\.max_steps=-1 \(no step limit\) needs trainer\.max_epochs >= 1"),
        (["trainer.max_steps=-2"], r"^trainer\.max_steps=-2 must be an integer >= -1$"),
        (["trainer.limit_val_batches=1.5"], r"^trainer\.limit_val_batches=1\.5 must be a number in \[0, 1\] or an integer >= 0$"),
        (["optim.beta1=1.5"], r"^optim\.beta1=1\.5 must be in \[0, 1\)$"),
        (["optim.beta2=-0.1"], r"^optim\.beta2=-0\.1 must be in \[0, 1\)$"),
        (["optim.weight_decay=-5"], r"^optim\.weight_decay=-5 must be >= 0$"),
        (["optim.lr=abc"], r"^optim\.lr='abc' must be a number$"),
        (["optim.warmup_steps=1.5"], r"^optim\.warmup_steps=1\.5 must be an integer$"),
        (["model.d_model=abc"], r"^model\.d_model='abc' must be an integer$"),
        (["moe.capacity_factor=abc"], r"^moe\.capacity_factor='abc' must be a number or null$"),
        (["parallel.timeout_s=0"], r"^parallel\.timeout_s=0 must be a number > 0 \(seconds\)$"),
        (["parallel.expert_tp=2"], r"^parallel\.expert_tp=2 must be true or false$"),
        (["data.val_fraction=abc"], r"^data\.val_fraction='abc' must be a number in \(0, 1\)$"),
        (["checkpoint_every_n_steps=0"], r"^checkpoint_every_n_steps=0 must be an integer >= 1 or null$"),
        (["+callbacks.extra=1"], r"^callbacks\.extra needs a _target_ \(the class to build\)"),
        (["+callbacks.extra._target_=collections.OrderedDict"], r"^callbacks\.extra: collections\.OrderedDict is not a lightning\.pytorch\.callbacks\.callback\.Callback$"),
        (["+logger.extra._target_=no.such.Logger"], r"^logger\.extra: no\.such\.Logger could not be built: "),
    ],
)
def test_bad_config_values(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(compose_cfg([*overrides, f"logger.csv.save_dir={tmp_path}"]), tmp_path)


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


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the default model: one whole, one per kind of damage, and two of other models."""
    from lightning_smartmoe.checkpoint import save
    from lightning_smartmoe.models import MoELMModule

    root = tmp_path_factory.mktemp("checkpoints")

    def saved(name: str, *overrides: str) -> Path:
        module = MoELMModule(config.model_config(compose_cfg(list(overrides))))
        module.configure_model()
        save(root / name, module, [], {"global_step": 0})
        return root / name

    out = {"whole": saved("whole.ckpt"), "d_model": saved("d64.ckpt", "model.d_model=64"),
           "experts": saved("e4.ckpt", "moe.num_experts=4")}
    for damage in ("truncated", "no_shard", "metadata"):
        out[damage] = saved(f"{damage}.ckpt")
    shard = next(out["truncated"].glob("*.distcp"))
    with shard.open("r+b") as f:
        f.truncate(1000)
    next(out["no_shard"].glob("*.distcp")).unlink()
    (out["metadata"] / ".metadata").write_bytes(b"garbage")
    return out


@pytest.mark.parametrize(
    "name,message",
    [
        ("truncated", r"shard __0_0\.distcp is truncated at 1000 bytes; model/\S+ needs bytes up to \d+$"),
        ("no_shard", r"shard __0_0\.distcp is missing \(it holds model/\S+\)$"),
        ("metadata", r": \.metadata could not be read: "),
        ("d_model", r"tensor model/model\.tok_emb\.weight has shape \[256, 64\] in the checkpoint; the model needs \[256, 128\]$"),
        ("experts", r"tensor model/model\.blocks\.0\.ffn\.router\.weight has shape \[4, 128\] in the checkpoint; the model needs \[8, 128\]$"),
    ],
)
def test_bad_checkpoints_are_refused_naming_the_first_bad_tensor(tmp_path, checkpoints, name, message):
    with pytest.raises(ConfigError, match=message):
        build(compose_cfg([f"ckpt_path={checkpoints[name]}", f"logger.csv.save_dir={tmp_path}"]), tmp_path)
    build(compose_cfg([f"ckpt_path={checkpoints['whole']}", f"logger.csv.save_dir={tmp_path}"]), tmp_path)


def test_ckpt_path_last_takes_the_newest_complete_checkpoint_or_starts_fresh(tmp_path, checkpoints):
    cfg = compose_cfg(["ckpt_path=last", f"logger.csv.save_dir={tmp_path}"])
    assert build(cfg, tmp_path)[3] is None
    folder = tmp_path / "checkpoints"
    shutil.copytree(checkpoints["whole"], folder / ".last.ckpt.0123abcd.tmp")  # a complete save, not renamed yet
    shutil.copytree(checkpoints["no_shard"], folder / "epoch=0-step=2.ckpt")
    os.utime(folder / "epoch=0-step=2.ckpt" / "meta.pt", (1, 1))  # written long before
    assert build(cfg, tmp_path)[3] == folder / "last.ckpt"  # the interrupted save was finished at start
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_callbacks_and_loggers_by_target(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    trainer = build(compose_cfg([
        "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor", "logger=[csv,tensorboard]",
        f"logger.csv.save_dir={tmp_path}", f"logger.tensorboard.save_dir={tmp_path}",
    ]), tmp_path)[0]
    assert {LearningRateMonitor, ModelSummary} <= {type(c) for c in trainer.callbacks}
    assert [type(x) for x in trainer.loggers] == [CSVLogger, TensorBoardLogger]
    rich = compose_cfg(["callbacks=[default,rich]", f"logger.csv.save_dir={tmp_path}"])
    if importlib.util.find_spec("rich") is not None:
        assert RichProgressBar in {type(c) for c in build(rich, tmp_path)[0].callbacks}
    else:  # not a dependency: a clear error names it
        with pytest.raises(ConfigError, match=r"^callbacks\.rich_progress_bar: lightning\.pytorch\.callbacks\.RichProgressBar could not be built: .*rich"):
            build(rich, tmp_path)


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "bad,message",
    [
        ("+placement.intervall=5", "placement.intervall is not a known key; allowed: calibrate, extra_slots, "),
        ("trainer.precision=bogus", "trainer.precision='bogus' is unknown; allowed: 64, 32, 16, "),
        ("truncated", "shard __0_0.distcp is truncated at 1000 bytes; "),
    ],
)
def test_cli_refuses_bad_input_before_any_rank_starts(tmp_path, checkpoints, bad, message):
    """A 2-process command with one bad input: exit code 2, one line on stderr, and no rank process ever started."""
    import cli

    bad = f"ckpt_path={checkpoints['truncated']}" if bad == "truncated" else bad
    run = cli.run("lightning_smartmoe.train", "trainer.devices=2", "parallel.ep=2", bad, f"hydra.run.dir={tmp_path}",
                  cwd=tmp_path, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("smartmoe-train: error: ") and message in lines[0], lines
    assert run.children_seen == set()


def test_max_steps_minus_one_schedules_the_learning_rate_by_epochs(tmp_path, corpus):
    """trainer.max_steps=-1 with max_epochs=1: the cosine schedule ends at min_lr after the epoch's last step."""
    import lightning.pytorch as pl

    import tiny
    from lightning_smartmoe.data import TokenDataModule
    from lightning_smartmoe.models import MoELMModule, OptimConfig

    module = MoELMModule(tiny.model_config(), OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="smartmoe", max_steps=-1, max_epochs=1, limit_train_batches=3,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, TokenDataModule(str(corpus), seq_len=16, global_batch_size=8, vocab_size=tiny.VOCAB))
    assert trainer.global_step == 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)
