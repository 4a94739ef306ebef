"""core.numeric: one_blas_thread limits every pool a fit uses, including those a solver loads on first call.

.venv/bin/pytest -q tests/core/test_numeric.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: every pool has one thread anyway")
def test_the_first_fit_in_a_fresh_process_runs_on_one_thread_in_every_pool():
    """In a fresh process (the CLI's train stage) scikit-learn and scipy load their BLAS/OpenMP pools inside the
    context; they ran on every core there, unlike in a process where select had loaded them first."""
    code = """
import json
import numpy as np
from threadpoolctl import threadpool_info
from transferkit.core.numeric import one_blas_thread
with one_blas_thread():
    from sklearn.linear_model import LogisticRegression
    LogisticRegression().fit(np.random.default_rng(0).random((40, 3)), np.arange(40) % 2)
    print(json.dumps([(i["filepath"].rsplit("/", 1)[-1], i["num_threads"]) for i in threadpool_info()]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    pools = json.loads(run.stdout)
    assert len(pools) >= 2  # numpy's BLAS and scipy's at least
    assert all(n == 1 for _, n in pools), pools
