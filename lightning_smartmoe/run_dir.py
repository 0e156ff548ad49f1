"""The default run directory name, `${run_name:}` in conf/train.yaml: unique per run, and the same on every rank of
one job without the user setting hydra.run.dir.

- SLURM: `slurm-<job id>` (`<array job id>_<task id>` for arrays). A requeued job keeps its id, so it reuses its
  run directory and `ckpt_path=last` resumes it.
- torchrun: `torchrun-<rendezvous id>` when a rendezvous id is given (`--rdzv-id`, or the random one
  of `--standalone`); otherwise, on one node, the agent's start time and process id, which its workers share.
  A restarted worker (`--max-restarts`) keeps the directory.
- otherwise: `<date>/<time>-<process id>`; the CLI's own launcher passes rank 0's directory to the other ranks.
"""

import os
import time
from pathlib import Path

from lightning_smartmoe.errors import ConfigError


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(seconds))


def _process_start(pid: int) -> float | None:
    """When process `pid` started (Linux /proc), in seconds since the epoch."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def run_name(env: dict[str, str] | None = None) -> str:
    """The run directory's path below outputs/ (see the module docstring). Raises ConfigError where the ranks of a
    job cannot agree on one without help."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" in env:
        if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
            return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return f"slurm-{env['SLURM_JOB_ID']}"
    if "TORCHELASTIC_RUN_ID" in env:
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id not in ("", "none"):
            return f"torchrun-{run_id}"
        if env.get("WORLD_SIZE") != env.get("LOCAL_WORLD_SIZE"):
            raise ConfigError(
                "torchrun on several nodes without --rdzv-id: the ranks cannot agree on a run directory; "
                "pass --rdzv-id or hydra.run.dir"
            )
        agent = os.getppid()
        started = _process_start(agent)
        if started is None:
            raise ConfigError("torchrun: cannot tell when the torchrun agent started; pass --rdzv-id or hydra.run.dir")
        return f"{_stamp(started)}-torchrun-{agent}"
    return f"{_stamp(time.time())}-{os.getpid()}"
