"""Checkpoint files: keyed by logical expert, whatever slot holds it; written by renames only."""

import lightning.pytorch as pl
import pytest
import torch

import tiny
from lightning_smartmoe import ConfigError, MoEConfig, MoELayer
from lightning_smartmoe.checkpoint import load, read_meta, save
from lightning_smartmoe.moe.dispatcher import TokenDispatcher
from lightning_smartmoe.placement import Placement


def trained_layer(slots: list[int]) -> tuple[MoELayer, torch.optim.Optimizer]:
    """A layer whose slots hold the logical experts `slots` (-1: empty), after one AdamW step."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, MoEConfig(num_experts=2, top_k=1))
    layer.experts.select(slots)
    layer.placement = Placement(2, 1, tuple(slots))
    layer.dispatcher = TokenDispatcher(len(slots))
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    y, aux = layer(torch.randn(2, 5, 8))
    (y.square().sum() + aux).backward()
    opt.step()
    return layer, opt


def test_experts_and_adam_state_follow_the_logical_id_with_an_empty_first_slot(tmp_path):
    layer, opt = trained_layer([-1, 1, 0])
    save(tmp_path / "ckpt", layer, [opt], {"note": 1})
    fresh = MoELayer(8, 16, MoEConfig(num_experts=2, top_k=1))
    fresh.experts.select([0, -1, 1])  # other slots, empty one in the middle
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    meta = load(tmp_path / "ckpt", fresh, [fresh_opt], read_meta(tmp_path / "ckpt"))
    assert meta["note"] == 1
    for old_slot, new_slot in ((2, 0), (1, 2)):  # expert 0, expert 1
        assert torch.equal(fresh.experts.w1[new_slot], layer.experts.w1[old_slot])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_opt.state[fresh.experts.w2][key][new_slot], opt.state[layer.experts.w2][key][old_slot])
    assert fresh_opt.state[fresh.experts.w1]["step"].device.type == "cpu"
    torch.testing.assert_close(fresh.router.weight, layer.router.weight, rtol=0, atol=0)


def test_optimizer_hyperparameters_come_back_but_not_the_loading_layouts_own_choices(tmp_path):
    """lr, betas and weight decay are the checkpoint's (a scheduler moved lr); the parameters a group holds and
    how the loading optimizer runs (foreach, fused, ...) stay the loader's."""
    layer, opt = trained_layer([0, 1])
    opt.param_groups[0].update(lr=0.0123, betas=(0.8, 0.9), weight_decay=0.3, foreach=False)
    save(tmp_path / "ckpt", layer, [opt], {})
    fresh = MoELayer(8, 16, MoEConfig(num_experts=2, top_k=1))
    fresh.experts.select([0, 1])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1, foreach=True)
    held = list(fresh_opt.param_groups[0]["params"])
    load(tmp_path / "ckpt", fresh, [fresh_opt], read_meta(tmp_path / "ckpt"))
    group = fresh_opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.0123, (0.8, 0.9), 0.3)
    assert group["foreach"] is True and all(a is b for a, b in zip(group["params"], held, strict=True))


def test_save_replaces_a_checkpoint_but_not_other_folders(tmp_path):
    layer, opt = trained_layer([0, 1])
    save(tmp_path / "ckpt", layer, [opt], {"step": 1})
    save(tmp_path / "ckpt", layer, [opt], {"step": 2})
    assert read_meta(tmp_path / "ckpt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old folders left
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a smartmoe checkpoint"):
        save(tmp_path / "runs", layer, [opt], {})
    assert (tmp_path / "runs" / "notes.txt").read_text() == "keep me"


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    layer, opt = trained_layer([0, 1])
    save(tmp_path / "ckpt", layer, [opt], {})
    bigger = MoELayer(8, 16, MoEConfig(num_experts=3, top_k=1))
    with pytest.raises(ConfigError, match=r"lacks tensors this model needs: 2, e\.g\. \['model/experts\.w1:2'"):
        load(tmp_path / "ckpt", bigger, [], read_meta(tmp_path / "ckpt"))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    layer, opt = trained_layer([0, 1])
    save(tmp_path / "ckpt", layer, [opt], {})
    (tmp_path / "ckpt" / "meta.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"ckpt_path=.*meta\.pt could not be read"):
        read_meta(tmp_path / "ckpt")
    for shard in (tmp_path / "ckpt").glob("*.distcp"):
        shard.write_bytes(b"garbage")
    torch.save({}, tmp_path / "ckpt" / "meta.pt")
    with pytest.raises(ConfigError, match=r"ckpt_path=.*could not be read"):
        load(tmp_path / "ckpt", layer, [opt], {})


class BatchRecorder(pl.Callback):
    """The first token of every sequence of each training batch, and the batches and step at each epoch end."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.epoch_ends: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch[0][:, 0].tolist())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_ends.append((len(self.batches), trainer.global_step))


@pytest.mark.timeout(300)
def test_resume_with_another_batch_split_keeps_the_data_order_and_epoch_length(corpus, tmp_path):
    """Saved with accumulate 2 (batches of 4) after step 2, resumed with accumulate 1 (batches of 8): every
    global batch is trained once, in order, and the epoch ends after its last full global batch."""
    config = tiny.model_config()
    whole = BatchRecorder()
    tiny.fit(corpus, config, steps=62, accumulate=2, callbacks=[whole], clip=None)
    full_steps = whole.epoch_ends[0][0] // 2  # global batches of 8 in the first epoch
    tiny.fit(corpus, config, steps=2, accumulate=2, save_dir=tmp_path, clip=None)
    resumed = BatchRecorder()
    tiny.fit(corpus, config, steps=62, accumulate=1, resume=tmp_path / "epoch=0-step=2.ckpt", callbacks=[resumed], clip=None)
    after = [a + b for a, b in zip(whole.batches[4::2], whole.batches[5::2])]  # global batches of steps 3, 4, ...
    assert resumed.batches[: full_steps - 2] == after[: full_steps - 2]
    assert resumed.epoch_ends[0] == (full_steps - 2, full_steps)
    with pytest.raises(ConfigError, match=r"cannot resume mid-epoch: .* data\.global_batch_size changed"):
        tiny.fit(corpus, config, steps=4, global_batch=12, resume=tmp_path / "epoch=0-step=2.ckpt")
