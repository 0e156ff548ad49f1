"""The popen launcher (the command is re-run per rank; the CLI's default), and how its job ends when a rank fails.

`ScriptLauncher` keeps rank 0 as the launching process and watches the other ranks: a rank that ends with an error
or by a signal other than an agreed stop (signals.py) ends the whole job, and rank 0 leaves only after its ranks
have.
"""

import os
import threading
import time
from collections.abc import Callable
from subprocess import Popen, TimeoutExpired
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_smartmoe.signals import STOP_SIGNALS, exit_code


class ScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's popen launcher with a `RankWatcher` instead of its child-process observer (which kills the job
    when a rank exits with the code of an agreed stop before rank 0 has finished), and a rank 0 that waits for
    its ranks before it returns."""

    def __init__(self, *args: Any, grace_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grace_s = grace_s

    def launch(self, function: Callable, *args: Any, trainer: "pl.Trainer | None" = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            RankWatcher(self.procs, self.grace_s).start()
        result = function(*args, **kwargs)
        self._wait_for_ranks()
        return result

    def _wait_for_ranks(self) -> None:
        """After rank 0's work: let the other ranks finish their exit (they left the same agreed step), at most
        `grace_s` seconds each before they are killed."""
        for proc in self.procs:
            try:
                proc.wait(timeout=self.grace_s)
            except TimeoutExpired:
                proc.kill()


class RankWatcher(threading.Thread):
    """Polls rank 0's child ranks. When one ends with anything but success or an agreed stop (exit code 130 or
    143), rank 0 and the other ranks get `grace_s` seconds to end by themselves (they will find the broken
    collectives, and rank 0 reports the error), then every rank still running is killed and this process exits
    with the failed rank's code."""

    ORDERLY = frozenset({0, *(exit_code(s) for s in STOP_SIGNALS)})

    def __init__(self, procs: list[Popen], grace_s: float, period_s: float = 0.25) -> None:
        super().__init__(daemon=True, name="smartmoe-rank-watcher")
        self.procs, self.grace_s, self.period_s = procs, grace_s, period_s

    def run(self) -> None:
        while True:
            codes = [p.poll() for p in self.procs]
            failed = next((c for c in codes if c is not None and c not in self.ORDERLY), None)
            if failed is not None:
                break
            if all(c is not None for c in codes):
                return
            time.sleep(self.period_s)
        rank = codes.index(failed) + 1
        code = failed if failed > 0 else exit_code(-failed)
        rank_zero_warn(f"rank {rank} ended with exit code {code}; ending the job in {self.grace_s:.0f} s at most")
        time.sleep(self.grace_s)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        os._exit(code)
