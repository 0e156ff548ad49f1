"""How busy the machine is, reported beside every bench figure."""


def cpu_pressure() -> float | None:
    """Linux PSI: share of the last 10 s some task waited for a CPU (None where unavailable)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None
