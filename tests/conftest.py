"""Suite-wide settings.

Intra-op threads: one per test by default (the tensors in the suite are small, and on a busy 2-core machine
thread hand-offs cost far more than the work). ``L2O_TEST_THREADS=16 pytest ...`` (or ``--torch-threads 16``) runs
every test with that many threads instead, the setting of a many-core machine: the suite must pass either way
(no result may depend on the thread count). Restored after each test.
"""

import os

# OpenMP threads that spin while waiting make tiny tensor ops very slow on a busy 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--torch-threads", type=int, default=None,
        help="torch intra-op threads per test (default: $L2O_TEST_THREADS, else 1)",
    )


def _test_threads(config) -> int:
    opt = config.getoption("--torch-threads")
    if opt is None:
        opt = int(os.environ.get("L2O_TEST_THREADS", "1"))
    if opt < 1:
        raise pytest.UsageError(f"--torch-threads / L2O_TEST_THREADS must be >= 1; got {opt}")
    return opt


@pytest.fixture(autouse=True)
def _test_thread_count(request):
    """Set the intra-op thread count for the test (one unless asked otherwise); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_test_threads(request.config))
    yield
    torch.set_num_threads(threads)
