"""bench/gpu.py --check, the CPU smoke run of the one prepared GPU script: every section must run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.mark.timeout(300)
def test_gpu_script_check_runs_every_section():
    run = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=280)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert {name: s["status"] for name, s in summary["sections"].items()} == dict.fromkeys(summary["sections"], "ok"), \
        {name: s.get("stderr_tail", "") for name, s in summary["sections"].items()}
    assert run.returncode == 0 and summary["kernels_all_ok"] is True
    assert summary["sections"]["train"]["results"]["train"]["steps"] == 3
