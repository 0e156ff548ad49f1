"""Checkpoint files: keyed by logical expert, whatever slot holds it; written by renames only."""

import pytest
import torch

from lightning_smartmoe import ConfigError, MoEConfig, MoELayer
from lightning_smartmoe.checkpoint import load, read_meta, save


def trained_layer(slots: list[int]) -> tuple[MoELayer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layer = MoELayer(8, 16, MoEConfig(num_experts=2, top_k=1))
    layer.experts.select(slots)
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
