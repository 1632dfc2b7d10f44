"""Shared helpers for the numgan benchmarks (issue 4): a timer that synchronises CUDA, the run header
(device, torch version, date, git commit, threads), markdown tables and result files.

Scripts live beside this file and are run as ``python benchmarks/<name>.py``; no timing ever enters the
test suite.
"""
from __future__ import annotations

import datetime as _dt
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], warmup: int = 3, repeat: int = 10, device="cpu") -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls (CUDA-synchronised)."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def git_commit() -> str:
    """Short hash of HEAD (``+dirty`` when the working tree has changes), or ``unknown``; ``$NUMGAN_COMMIT``
    overrides it (a copy of the checkout, e.g. on a GPU machine, may carry a stale HEAD)."""
    import os

    if os.environ.get("NUMGAN_COMMIT"):
        return os.environ["NUMGAN_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def header(device) -> dict:
    """Facts that belong with every timing: device, torch/CUDA version, date, commit, threads, TF32 flags."""
    device = torch.device(device)
    head = {"device": device_name(device), "torch": torch.__version__,
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
            "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        head["cuda"] = torch.version.cuda
        head["tf32 matmul/cudnn"] = f"{torch.backends.cuda.matmul.allow_tf32}/{torch.backends.cudnn.allow_tf32}"
    return head


def format_header(head: dict) -> str:
    """The header on one line."""
    return " | ".join(f"{k}: {v}" for k, v in head.items())


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts) in the given column order (default: keys in first-seen order);
    floats get 4 significant digits."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def header_text(device) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in header(device).items())


def record(name: str, device, text: str) -> Path:
    """Append ``text`` to ``benchmarks/results/<name>-<device type>.md`` and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{torch.device(device).type}.md"
    with open(path, "a") as f:
        f.write(text.rstrip() + "\n\n")
    return path


def report(name: str, device, text: str, save: bool) -> None:
    """Print a benchmark's table text; with ``save``, also append it to results/ (see :func:`record`)."""
    print(text)
    if save:
        print("recorded in", record(name, device, text))


def module_from_source(src: str, name: str):
    """Import the Python source ``src`` of a numgan module as a module called ``name`` (for timing or compiling
    an earlier version of a kernel module beside the working tree's). Its relative imports of numgan modules are
    made absolute, so it uses the working tree's versions of those."""
    import importlib.util
    import tempfile

    src = re.sub(r"^(\s*)from \.([\w.]*) import", lambda m: f"{m.group(1)}from numgan{'.' if m.group(2) else ''}"
                 f"{m.group(2)} import", src, flags=re.M)
    name = re.sub(r"\W", "_", name)
    file = Path(tempfile.mkdtemp(prefix="numgan-module-")) / f"{name}.py"
    file.write_text(src)   # Triton's jit reads kernel source from the module's file
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def module_at(rev: str, path: str = "numgan/mog_triton.py"):
    """The module at ``path`` as committed at git revision ``rev`` (:func:`module_from_source`); needs the
    repository's history (a copy of the working tree without ``.git`` has none: pass the file instead)."""
    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"cannot read {path} at {rev} (no git history here? pass the file itself): "
                         f"{getattr(e, 'stderr', '') or e}".strip())
    return module_from_source(src, f"{Path(path).stem}_{rev}")
