"""Test-session set-up: a private run cache, a non-interactive matplotlib backend, quiet torch warnings; the
``float64`` fixture."""
import os
import tempfile
import warnings

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# every test session trains from scratch: runs go to a temporary cache, never to <repo>/runs
os.environ["NUMGAN_RUNS"] = os.environ.get("NUMGAN_TEST_RUNS") or tempfile.mkdtemp(prefix="numgan-test-runs-")
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


@pytest.fixture
def float64():
    """Float64 as torch's default dtype for one test (exact comparisons), restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
