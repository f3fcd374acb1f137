"""`jobs/gpu_check.py`, the GPU check, as a dry run on the CPU: every check but the FAISS GPU one
runs the same code it runs on a GPU node, and agrees with the CPU."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


def test_gpu_check_dry_run_on_the_cpu(ray_head):
    done = subprocess.run([sys.executable, "-m", "jobs.gpu_check", "--device", "cpu", "--quick", "--ray-address",
                           ray_head.address], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    for check in ("extract", "srd", "bisect", "lasso", "gig", "ray"):
        assert lines[check].split()[1] == "ok", lines[check]
        assert float(lines[check].split()[2]) <= 1e-3  # on one device the same code agrees with itself
    assert "skipped" in lines["kmeans"] and done.stdout.rstrip().endswith("all checks passed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU node the check runs for real")
def test_gpu_check_says_when_there_is_no_gpu():
    done = subprocess.run([sys.executable, "-m", "jobs.gpu_check"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "CUDA is not available here" in done.stderr
