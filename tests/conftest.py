"""Test-session set-up: one torch thread per core for each pytest-xdist worker.

With two workers on two cores, each worker's default two OpenMP threads spin against the
other's, and small ops got tens of times slower (an importance-weighted bound test: 85 s
instead of 4). Subprocesses the tests start (CLI runs, DDP ranks) inherit the same through
OMP_NUM_THREADS unless a test sets it.
"""

import os

import torch

workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
threads = max(1, len(os.sched_getaffinity(0)) // workers)
torch.set_num_threads(threads)
os.environ.setdefault("OMP_NUM_THREADS", str(threads))
