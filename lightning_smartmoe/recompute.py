"""Activation recomputation: a region's activations are dropped after its forward and recomputed in backward
(torch.utils.checkpoint, non-reentrant). The recomputation runs under the forward's default dtype (Lightning's
64-true sets it for the forward only) and autocast state, draws the same random numbers as the forward did
(torch's default stream and each tensor-parallel rank's own, `tensor_parallel.rank_random`), runs the same
collectives in the same order on every rank, and is visible to the region through `is_recomputing`, so that
side effects such as the MoE load statistics are recorded once."""

from collections.abc import Callable, Generator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from lightning_smartmoe import tensor_parallel

MODES = ("none", "selective", "full")  # selective: the attention core; full: each transformer block

_depth = 0  # recomputations running (backward runs them one at a time, but regions may nest)


def is_recomputing() -> bool:
    """Whether the code running is a recomputation in backward."""
    return _depth > 0


def recomputed(fn: Callable[..., torch.Tensor], *args: object) -> object:
    """fn(*args), keeping only its inputs for backward and recomputing the rest there (with grad disabled: just
    fn(*args))."""
    if not torch.is_grad_enabled():
        return fn(*args)
    forward_state: dict = {}
    forward_dtype = torch.get_default_dtype()

    @contextmanager
    def forward() -> Generator[None, None, None]:
        forward_state.update(tensor_parallel.rank_random_state())
        yield

    @contextmanager
    def recompute() -> Generator[None, None, None]:
        global _depth
        later, later_dtype = tensor_parallel.rank_random_state(), torch.get_default_dtype()
        tensor_parallel.set_rank_random_state(forward_state)
        torch.set_default_dtype(forward_dtype)
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            torch.set_default_dtype(later_dtype)
            tensor_parallel.set_rank_random_state(later)

    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=lambda: (forward(), recompute()))
