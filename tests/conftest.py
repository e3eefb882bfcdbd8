"""Test-session set-up: one torch thread per core for each pytest-xdist worker.

With two workers on two cores, each worker's default two OpenMP threads spin against the
other's, and small ops got tens of times slower (an importance-weighted bound test: 85 s
instead of 4). Subprocesses the tests start (CLI runs, DDP ranks) inherit the same through
OMP_NUM_THREADS unless a test sets it. A test file that sets its own count at import made
the whole suite 2.4x slower, so every test starts by checking the count.
"""

import os

import pytest
import torch

workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
threads = max(1, len(os.sched_getaffinity(0)) // workers)
torch.set_num_threads(threads)
os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.fixture(autouse=True)
def one_thread_per_core(request):
    """Fail a test that starts with another thread count (set by its file or a test before
    it) instead of letting it spin against the other worker; a test may change the count
    for itself if it puts it back."""
    found = torch.get_num_threads()
    if found != threads:
        torch.set_num_threads(threads)
        pytest.fail(
            f"torch had {found} threads at the start of {request.node.nodeid}, not the "
            f"{threads} tests/conftest.py gives each of {workers} worker(s): do not call "
            "torch.set_num_threads at import, and restore the count after a test changes it"
        )


def pytest_collection_modifyitems(items):
    """The longest test file (the whole quickstart, ~6 minutes on one core) first, so that
    pytest-xdist starts it at once and runs the other files beside it."""
    items.sort(key=lambda item: item.path.name != "test_quickstart.py")  # stable
