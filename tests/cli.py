"""Run a CLI as a user would, in its own process group, and watch the processes it starts (Linux /proc)."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (empty once it is gone)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Whether `pid` is running (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    children_seen: set[int] = field(default_factory=set)  # every child process of the CLI seen while it ran
    signal_sent_at: float | None = None
    all_gone_after_s: float | None = None  # seconds from the signal until the CLI and every child seen were gone


def run(
    module: str, *args: str, cwd: Path, timeout: float, launcher: tuple[str, ...] = (),
    on_poll: Callable[[subprocess.Popen, set[int]], bool] | None = None, env: dict[str, str] | None = None,
) -> Run:
    """`python [launcher] -m module args` in a new session. Every 50 ms the CLI's children are recorded and
    `on_poll(proc, children)` may act (it returns True once it has sent a signal; the time is noted). Kills the
    whole session and fails after `timeout` seconds."""
    proc = subprocess.Popen(
        [sys.executable, *launcher, "-m", module, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env={**os.environ, **(env or {})},
    )
    seen: set[int] = set()
    sent_at = None
    deadline = time.monotonic() + timeout
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda n=n, s=s: out.__setitem__(n, s.read()), daemon=True)
               for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    while proc.poll() is None or any(alive(c) for c in seen):
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            for c in seen:
                if alive(c):
                    os.kill(c, signal.SIGKILL)
            raise TimeoutError(f"{module} {' '.join(args)} still running after {timeout} s")
        if proc.poll() is None:
            seen.update(children(proc.pid))
        if sent_at is None and on_poll is not None and on_poll(proc, seen):
            sent_at = time.monotonic()
        time.sleep(0.05)
    gone = time.monotonic()
    for r in readers:
        r.join()
    return Run(proc.returncode, out["stdout"], out["stderr"], seen, sent_at,
               gone - sent_at if sent_at is not None else None)


def run_main(main: Callable[[], None], name: str, monkeypatch, capsys, cwd: Path, *overrides: str) -> tuple[int, str, str]:
    """A Hydra CLI's `main` in this process as `name overrides...` from `cwd`: (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [name, *overrides])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
