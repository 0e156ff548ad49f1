"""How busy and how steady the machine is, reported beside every bench figure.

    .venv/bin/python bench/machine.py [--seconds 8] [--core 0]

prints the drift of a fixed workload (one thread, pinned): the median time of 20 matmuls [1024, 256] @ [256, 1024]
per block of 20 such samples; the last line is one JSON object.
"""

import argparse
import json
import os
import statistics
import time


def cpu_pressure() -> float | None:
    """Linux PSI: share of the last 10 s some task waited for a CPU (None where unavailable)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_times() -> list[int] | None:
    """The machine's CPU time so far, in clock ticks: /proc/stat's first line (user, nice, system, idle, iowait,
    irq, softirq, steal, ...); None where unavailable."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_share(start: list[int] | None) -> float | None:
    """Share of the machine's CPU time since `start` (cpu_times()) that the hypervisor gave to other guests
    ("steal"): time this VM's runnable tasks lost without it showing as load here."""
    end = cpu_times()
    if start is None or end is None or len(end) < 8:
        return None
    delta = [b - a for a, b in zip(start, end)]
    return round(delta[7] / max(1, sum(delta[:8])), 4)


def vm_mib(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS: resident now, VmHWM: peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def drift(seconds: float, core: int) -> dict:
    """Block medians (ms) of a fixed matmul workload run for `seconds` on `core`."""
    import torch

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    a, w = torch.randn(1024, 256), torch.randn(256, 1024)
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(20):
            a @ w
        samples.append((time.perf_counter() - t0) * 1e3)
    blocks = [statistics.median(samples[i : i + 20]) for i in range(0, len(samples) - 19, 20)]
    return {"core": core, "samples": len(samples), "block_medians_ms": [round(b, 1) for b in blocks],
            "max_over_min": round(max(blocks) / min(blocks), 3) if blocks else None, "cpu_pressure": cpu_pressure()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--core", type=int, default=0)
    args = parser.parse_args()
    result = drift(args.seconds, args.core)
    print(f"core {result['core']}: block medians {result['block_medians_ms']} ms, max/min {result['max_over_min']}")
    print(json.dumps(result))
