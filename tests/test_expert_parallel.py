"""Data + expert parallel training reproduces the single-process run (float64, same global batch), and
checkpoints move between layouts. Real gloo process groups; each spawn runs several layouts."""

from pathlib import Path

import pytest

from distributed import run_distributed
import tiny
from tiny import assert_same_run

CAPACITY = dict(gate="naive", capacity_factor=1.0)  # drops tokens
DROPLESS = dict(gate="naive", capacity_factor=None)
STEPS = 5


def _layouts(corpus: str, cases: list[tuple[str, dict, int, int]], save: str | None):
    """Run on every rank: each case is (name, model kwargs, ep, accumulate)."""
    results = {
        name: tiny.fit(Path(corpus), tiny.model_config(**kw), ep=ep, steps=STEPS, accumulate=acc)
        for name, kw, ep, acc in cases
    }
    if save is not None:  # a run at this layout that checkpoints mid-epoch, every 2 steps
        results["saved"] = tiny.fit(Path(corpus), tiny.model_config(**DROPLESS), ep=4, steps=4,
                                    save_dir=Path(save))
    return results


@pytest.fixture(scope="module")
def reference(corpus):
    """Single-process runs, keyed by (gate kwargs, accumulate)."""
    cache = {}

    def get(kw: dict, accumulate: int = 1):
        key = (tuple(sorted(kw.items())), accumulate)
        if key not in cache:
            cache[key] = tiny.fit(corpus, tiny.model_config(**kw), steps=STEPS, accumulate=accumulate)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def four_ranks(corpus, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    cases = [
        ("dp4_ep2_capacity", CAPACITY, 2, 1),
        ("dp4_ep4_dropless", DROPLESS, 4, 1),
        ("dp4_ep2_accumulate2", DROPLESS, 2, 2),
        ("dp4_ep1_capacity", CAPACITY, 1, 1),
    ]
    return run_distributed(4, _layouts, str(corpus), cases, str(ckpt_dir), timeout=300)[0], ckpt_dir


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "name,kw,accumulate",
    [("dp4_ep2_capacity", CAPACITY, 1), ("dp4_ep4_dropless", DROPLESS, 1),
     ("dp4_ep2_accumulate2", DROPLESS, 2), ("dp4_ep1_capacity", CAPACITY, 1)],
)
def test_four_ranks_match_single_process(four_ranks, reference, name, kw, accumulate):
    assert_same_run(four_ranks[0][name], reference(kw, accumulate))


@pytest.mark.timeout(300)
def test_two_ranks_match_and_resume_at_other_ep(corpus, reference, four_ranks):
    results, ckpt_dir = four_ranks
    ckpt = ckpt_dir / "epoch=0-step=2.ckpt"
    cases = [("dp2_ep1_dropless", DROPLESS, 1, 1), ("dp2_ep2_capacity", CAPACITY, 2, 1)]
    two = run_distributed(2, _resume_and_layouts, str(corpus), cases, str(ckpt), timeout=240)[0]
    assert_same_run(two["dp2_ep1_dropless"], reference(DROPLESS))
    assert_same_run(two["dp2_ep2_capacity"], reference(CAPACITY))
    # Saved at ep=4 on 4 ranks after step 2; resumed at ep=2 on 2 ranks and in one process.
    saved_losses, saved_params = results["saved"]
    resumed_losses, resumed_params = two["resumed"]
    assert_same_run((resumed_losses, resumed_params), (saved_losses[2:], tiny.weights(saved_params)))
    single = tiny.fit(corpus, tiny.model_config(**DROPLESS), steps=4, resume=ckpt)
    assert_same_run(single, (saved_losses[2:], tiny.weights(saved_params)))


def _resume_and_layouts(corpus: str, cases, ckpt: str):
    results = _layouts(corpus, cases, None)
    results["resumed"] = tiny.fit(Path(corpus), tiny.model_config(**DROPLESS), ep=2, steps=4,
                                  resume=Path(ckpt))
    return results


@pytest.mark.timeout(300)
def test_eight_ranks_one_expert_each(corpus, reference):
    eight = run_distributed(8, _layouts, str(corpus), [("dp8_ep8", CAPACITY, 8, 1)], None, timeout=280)[0]
    assert_same_run(eight["dp8_ep8"], reference(CAPACITY))
