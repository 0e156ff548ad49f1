"""Default run directories: unique per run, shared by every rank of one job."""

import os
import re

import pytest

from lightning_smartmoe import ConfigError
from lightning_smartmoe.run_dir import run_name


def test_slurm_job_keeps_its_directory_across_requeues():
    assert run_name({"SLURM_JOB_ID": "4711"}) == "slurm-4711"
    assert run_name({"SLURM_JOB_ID": "4712", "SLURM_ARRAY_JOB_ID": "4711", "SLURM_ARRAY_TASK_ID": "3"}) == "slurm-4711_3"


def test_torchrun_ranks_agree():
    assert run_name({"TORCHELASTIC_RUN_ID": "job7"}) == "torchrun-job7"
    # without a rendezvous id, on one node: the agent (this process's parent) names it, the same for every worker
    env = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-torchrun-{os.getppid()}", run_name(env))
    assert run_name(env) == run_name(env)
    with pytest.raises(ConfigError, match="torchrun on several nodes without --rdzv-id"):
        run_name({"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})


def test_runs_started_in_the_same_second_differ_by_process_id():
    name = run_name({})
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-{os.getpid()}", name), name
