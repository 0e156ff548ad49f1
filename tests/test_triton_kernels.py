"""The Triton kernels against their torch references, in Triton's interpreter on CPU (the cases: kernel_cases.py).

TRITON_INTERPRET=1 must be set before triton is imported, and must not leak into the other tests, so the cases
run in one child process; each case is reported here as a test of its own.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_cases import CASES

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOE_KERNELS": "triton", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "kernel_cases.py"), "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_in_interpreter(interpreted_results, name):
    result = interpreted_results[name]
    assert result["ok"], result["error"]
