import os
import sys

# tests/oracle.py is a helper module shared by the test files.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for the module using it: its models are tiny, so torch's
    threads only wait on each other, and under a parallel test run (pytest -n) they spin
    against the other workers' (a 64-wide MLP's training ran 18 s instead of 2)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

