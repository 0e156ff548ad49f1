"""ZeRO stages 1 and 2 (parallel.zero) reproduce the unsharded single-process run (float64, tiny.RTOL), with
expert parallelism, tensor and pipeline parallelism and placement switches; each rank keeps 1/n of the optimizer
state; checkpoints of a sharded run resume unsharded under another layout. Real gloo process groups."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

import tiny
from distributed import run_distributed
from test_placement_switching import RandomSwitches
from tiny import assert_same_run

STEPS = 5
MODEL = dict(num_experts=8)


class StateBytes(pl.Callback):
    """Elements of optimizer state (tensors shaped like what the optimizer steps) on this rank, after training,
    and the dtypes of the parameters and of what the optimizer steps."""

    def on_train_end(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        stepped = [t for group in opt.param_groups for t in group["params"]]
        self.elements = sum(v.numel() for t in stepped for v in opt.state.get(t, {}).values() if v.shape == t.shape)
        self.param_dtypes = sorted({str(p.dtype) for p in pl_module.parameters()})
        self.stepped_dtypes = sorted({str(t.dtype) for t in stepped})


def _fit(corpus: str, model=None, **kw):
    return tiny.fit(Path(corpus), model or tiny.model_config(**MODEL), steps=STEPS, **kw)


def _four_ranks(corpus: str, save: str) -> dict:
    results, counts = {}, {}
    for name, kw in [
        ("dp4_zero2", dict(zero=2)),
        ("dp4_ep2_zero1_switches", dict(zero=1, ep=2, extra_slots=1)),
        ("dp4_ep2_zero2_switches", dict(zero=2, ep=2, extra_slots=1)),
        ("tp2_dp2_ep2_zero2", dict(zero=2, tp=2, ep=2)),
        ("tp2_dp2_expert_tp_zero1", dict(zero=1, tp=2, expert_tp=True, sequence_parallel=True)),
        ("pp2_dp2_ep2_zero2_switches", dict(zero=2, pp=2, ep=2, microbatches=2, extra_slots=1)),
        ("dp4_zero0", dict(zero=0)),
    ]:
        state = StateBytes()
        callbacks = [state] + ([RandomSwitches(extra=1)] if name.endswith("switches") else [])
        results[name] = _fit(corpus, callbacks=callbacks, **kw)
        counts[name] = state.elements
    results["saved_dp4_ep2_zero1"] = _fit(corpus, zero=1, ep=2, save_dir=Path(save))
    for name, kw in (("dp4_zero1_bf16", dict(zero=1)), ("pp2_dp2_ep2_zero2_bf16", dict(zero=2, pp=2, ep=2, microbatches=2))):
        bf16 = StateBytes()
        results[name] = _fit(corpus, precision="bf16-mixed", callbacks=[bf16], **kw)
        results[f"{name}_dtypes"] = (bf16.param_dtypes, bf16.stepped_dtypes)
    total = torch.tensor([counts[name] for name in counts], dtype=torch.float64)
    dist.all_reduce(total)
    results["state_elements"] = dict(zip(counts, (total / dist.get_world_size()).tolist()))  # mean over ranks
    results["rank_state_elements"] = counts
    return results


@pytest.fixture(scope="module")
def four_ranks(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("zero_ckpt")
    return run_distributed(4, _four_ranks, str(corpus), str(save), timeout=300), save


@pytest.fixture(scope="module")
def reference(corpus):
    cache = {}

    def get(microbatches: int = 1):
        if microbatches not in cache:
            losses, params = _fit(corpus, accumulate=microbatches)
            cache[microbatches] = torch.tensor(losses, dtype=torch.float64).view(-1, microbatches).mean(1).tolist(), params
        return cache[microbatches]

    return get


@pytest.mark.timeout(360)
@pytest.mark.parametrize("name,microbatches", [
    ("dp4_zero2", 1), ("dp4_ep2_zero1_switches", 1), ("dp4_ep2_zero2_switches", 1), ("tp2_dp2_ep2_zero2", 1),
    ("tp2_dp2_expert_tp_zero1", 1), ("pp2_dp2_ep2_zero2_switches", 2),
])
def test_four_ranks_match_single_process(four_ranks, reference, name, microbatches):
    assert_same_run(four_ranks[0][0][name], reference(microbatches))


@pytest.mark.timeout(360)
def test_each_rank_keeps_a_quarter_of_the_optimizer_state(four_ranks):
    """dp=4 without expert parallelism: dense parameters and experts are both cut over 4 ranks (a block is at most
    one row larger than a quarter, and some 1-D tensors of the tiny model have 32 rows)."""
    elements = four_ranks[0][0]["state_elements"]
    assert elements["dp4_zero0"] / 4 <= elements["dp4_zero2"] <= elements["dp4_zero0"] / 4 * 1.05
    for rank in four_ranks[0]:
        assert rank["rank_state_elements"]["dp4_zero2"] <= rank["rank_state_elements"]["dp4_zero0"] / 4 * 1.05


@pytest.mark.timeout(360)
@pytest.mark.parametrize("name,microbatches", [("dp4_zero1_bf16", 1), ("pp2_dp2_ep2_zero2_bf16", 2)])
def test_bf16_mixed_keeps_bf16_weights_and_fp32_masters(four_ranks, reference, name, microbatches):
    """Every weight is stored in bf16 (so pipeline stages pass bf16 activations alike), the optimizer steps fp32
    masters (blocks where cut), and training tracks the float64 run as bf16-mixed does without ZeRO."""
    from test_layouts import TRACKING_RTOL

    results = four_ranks[0][0]
    assert results[f"{name}_dtypes"] == (["torch.bfloat16"], ["torch.float32"])
    losses, ref_losses = results[name][0], reference(microbatches)[0]
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)) <= TRACKING_RTOL["bf16-mixed"][0]


def _two_ranks(corpus: str, ckpt: str) -> dict:
    return {
        "dp2_zero1": _fit(corpus, zero=1),
        "dp2_ep2_zero2_switches": _fit(corpus, zero=2, ep=2, extra_slots=1, callbacks=[RandomSwitches(extra=1)]),
        "resumed_dp2_zero0": _fit(corpus, zero=0, resume=Path(ckpt)),
        "resumed_dp2_ep2_zero2": _fit(corpus, zero=2, ep=2, resume=Path(ckpt)),
        "llama_dp2_ep2_zero2_switches": _fit(corpus, tiny.llama_config(), zero=2, ep=2, extra_slots=1,
                                             callbacks=[RandomSwitches(extra=1)]),
    }


@pytest.fixture(scope="module")
def two_ranks(four_ranks, corpus):
    return run_distributed(2, _two_ranks, str(corpus), str(four_ranks[1] / "epoch=0-step=2.ckpt"), timeout=200)[0]


@pytest.mark.timeout(360)
@pytest.mark.parametrize("name", ["dp2_zero1", "dp2_ep2_zero2_switches"])
def test_two_ranks_match_single_process(two_ranks, reference, name):
    assert_same_run(two_ranks[name], reference(1))


@pytest.mark.timeout(360)
def test_swiglu_and_shared_experts_with_expert_bias_under_zero2_and_switches(two_ranks, corpus):
    """The Llama model's blocks of w1, w3, w2, shared experts and their Adam state, cut by ZeRO and migrated."""
    assert_same_run(two_ranks["llama_dp2_ep2_zero2_switches"], _fit(corpus, tiny.llama_config()))


@pytest.mark.timeout(360)
def test_sharded_checkpoint_resumes_under_other_stages_on_two_ranks_and_in_one_process(four_ranks, two_ranks, corpus):
    """Saved at zero=1 on dp=4 (ep=2: experts cut over 2) after step 2; resumed at zero=0 and at zero=2 (other
    blocks) on dp=2, and in one process."""
    results, save = four_ranks
    saved_losses, saved_params = results[0]["saved_dp4_ep2_zero1"]
    expected = (saved_losses[2:], tiny.weights(saved_params))
    assert_same_run(two_ranks["resumed_dp2_zero0"], expected)
    assert_same_run(two_ranks["resumed_dp2_ep2_zero2"], expected)
    assert_same_run(_fit(corpus, resume=save / "epoch=0-step=2.ckpt"), expected)
