"""Test-session set-up: a private run cache, a non-interactive matplotlib backend, quiet torch warnings."""
import os
import tempfile
import warnings

os.environ.setdefault("MPLBACKEND", "Agg")
# every test session trains from scratch: runs go to a temporary cache, never to <repo>/runs
os.environ["NUMGAN_RUNS"] = os.environ.get("NUMGAN_TEST_RUNS") or tempfile.mkdtemp(prefix="numgan-test-runs-")
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
