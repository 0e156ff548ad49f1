"""The CLI trains gpt_moe_tiny on the embedded corpus and writes its outputs to the Hydra run directory."""

import csv
import math
import subprocess
import sys

import pytest


@pytest.mark.timeout(400)
def test_fifty_steps_of_tiny_lower_validation_loss(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_smartmoe.train", "recipe=gpt_moe_tiny", "trainer.max_steps=50",
         "trainer.val_check_interval=10", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=380, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 5
    assert val[0] < math.log(256)  # below a uniform byte model after 10 steps
    assert val[-1] < val[0] - 0.2, val  # and keeps falling
    logged = {k for r in rows for k, v in r.items() if v}
    for key in ("train/loss", "train/ppl", "train/aux_loss", "train/z_loss", "train/dropped_frac",
                "train/tokens_per_s", "moe/layer0/load_max_over_mean", "moe/layer3/load_max_over_mean", "val/ppl"):
        assert key in logged, key
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt" / "meta.pt").is_file()


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    "launch,layout",
    [
        ("popen", ["parallel.ep=2"]),
        ("torchrun", ["parallel.ep=2"]),
        ("popen", ["parallel.pp=2", "parallel.microbatches=2"]),
        ("torchrun", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    ],
)
def test_cli_trains_on_two_processes(tmp_path, launch, layout):
    """The CLI's own launcher (re-running the command per rank) and torchrun's processes both work, with expert,
    pipeline and tensor parallelism; the loss reaches rank 0's logger from the last pipeline stage."""
    prefix = [sys.executable, "-m"] if launch == "popen" else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m"]
    result = subprocess.run(
        [*prefix, "lightning_smartmoe.train", "recipe=gpt_moe_tiny", "trainer.devices=2", *layout,
         "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(float(r["val/loss"])) for r in rows if r.get("val/loss"))
    assert (tmp_path / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
