"""Stopping on SIGTERM or SIGINT at a step boundary that every rank agrees on.

Lightning's SIGTERM handler broadcasts from inside the handler, which deadlocks ranks that are inside other
collectives, and SIGINT raises KeyboardInterrupt wherever a rank happens to be. Here a handler only records the
signal. After each optimizer step the ranks all-reduce what they received (`StopSignal.agree`), so a signal sent
to any one rank, or to the launcher that forwards it, stops every rank after the same step.
"""

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by signal `signum` (130 for SIGINT, 143 for SIGTERM), which
    SLURM and torchrun requeue logic read."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignal:
    """Records SIGTERM and SIGINT instead of acting on them, until `restore`."""

    def __init__(self) -> None:
        self.received = 0  # the first stop signal this process got, 0 if none
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Handle the stop signals here (main thread only; a no-op elsewhere). May be called again to take the
        handlers back from code that replaced them; `restore` returns to the ones before the first call."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._record)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received = signum

    def agree(self, device: torch.device) -> int:
        """Collective over the world: the stop signal any rank received (the largest number if they differ), 0 if
        none did."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
