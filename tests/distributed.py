"""Run a function on N real gloo processes, with a hard timeout so a hang fails instead of stalling."""

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(*args)
        queue.put((rank, "ok", pickle.dumps(result)))  # plain pickle: no shared-memory handles
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(world: int, fn: Callable, *args: Any, timeout: float = 240, dies: frozenset[int] = frozenset()) -> list[Any]:
    """Run fn(*args) on `world` ranks (env set as torchrun would, process group initialised).

    Returns each rank's result, in rank order (None for the ranks in `dies`, which are expected to kill
    themselves). Raises on any other rank's error or death, or on timeout.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world - len(dies):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed run of {fn.__name__} on {world} ranks timed out after {timeout} s")
            if queue.empty():
                if any(p.exitcode not in (None, 0) for r, p in enumerate(procs) if r not in dies):
                    raise RuntimeError(f"a rank of {fn.__name__} died: exit codes {[p.exitcode for p in procs]}")
                time.sleep(0.05)
                continue
            rank, status, value = queue.get()
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results.get(r) for r in range(world)]
