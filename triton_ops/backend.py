"""Which implementation an op runs: the torch reference path or the Triton kernels, and measured choices.

`MOE_KERNELS=torch|triton` overrides the default (Triton for CUDA tensors, torch elsewhere). `triton` on CPU
tensors runs the kernels in Triton's interpreter, which needs `TRITON_INTERPRET=1` in the environment before
triton is first imported.
"""

import functools
import os
import time
from collections.abc import Callable

import torch
from torch import Tensor

CHOICES = ("torch", "triton")


def interpreting() -> bool:
    """Triton kernels run in the interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_for(t: Tensor) -> str:
    """'triton' or 'torch' for an op whose main input is `t` (MOE_KERNELS, read at every call, else by device)."""
    choice = os.environ.get("MOE_KERNELS", "")
    if choice not in ("", *CHOICES):
        raise ValueError(f"MOE_KERNELS={choice!r} is unknown; allowed: torch, triton (or unset: by device)")
    if not choice:
        return "triton" if t.is_cuda and _triton_present() else "torch"
    if choice == "triton" and not t.is_cuda and not interpreting():
        raise RuntimeError(
            f"MOE_KERNELS=triton on a {t.device.type} tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported"
        )
    return choice


def kernels_forced() -> bool:
    """MOE_KERNELS is set: the choice is the user's, not measured."""
    return bool(os.environ.get("MOE_KERNELS"))


@functools.cache
def _triton_present() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_CHOSEN: dict[tuple, str] = {}
REPEATS = 5


def fastest(key: tuple, candidates: dict[str, Callable[[], object]], device: torch.device) -> str:
    """Name of the fastest of `candidates` (each a call with the real inputs), measured once per `key` at first use.

    Each runs once to warm up, then REPEATS times, the candidates taking turns so that a change in the machine's
    speed hits them alike; the lowest minimum wins. Calls must not change their inputs (see `with_backward`).
    Only speed is measured: every candidate must compute the same thing. A candidate that raises RuntimeError
    (e.g. a library kernel this device lacks) is left out, unless all do.
    """
    if len(candidates) == 1:
        return next(iter(candidates))
    if key not in _CHOSEN:
        working, errors = {}, []
        for name, call in candidates.items():
            try:
                call()
                working[name] = call
            except RuntimeError as err:
                errors.append(err)
        if not working:
            raise errors[0]
        best = dict.fromkeys(working, float("inf"))
        for _ in range(REPEATS):
            for name, call in working.items():
                _sync(device)
                t0 = time.perf_counter()
                call()
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - t0)
        _CHOSEN[key] = min(best, key=best.get)
    return _CHOSEN[key]


def with_backward(fn: Callable[..., Tensor], *inputs) -> Callable[[], None]:
    """A call of fn(*inputs) and its backward (output gradient ones) on detached copies of the floating-point
    inputs, so that the measurement costs what training costs and no real gradient accumulates."""

    def call() -> None:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs]
            out = fn(*leaves)
            out.backward(torch.ones_like(out))

    return call


def chosen() -> dict[tuple, str]:
    """Every measured choice so far, by key (for benchmarks to report)."""
    return dict(_CHOSEN)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
