"""Shared helpers of the benchmark scripts: timing with device synchronisation, the run header
(device, torch version, date, commit, threads) and markdown tables recorded under benchmarks/results/.

Benchmarks print tables; they never assert on timings (tests do not time anything)."""
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, warmup: int = 1, repeat: int = 5, device="cpu") -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls, with the device
    synchronised before and after each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() or "unknown") + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("NUMGAN_COMMIT", "unknown")


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def header(device) -> dict:
    """What a recorded result must carry: device, torch/CUDA version, date, commit, threads, TF32."""
    device = torch.device(device)
    return {"device": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else "-",
            "date": datetime.date.today().isoformat(), "commit": os.environ.get("NUMGAN_COMMIT") or _commit(),
            "threads": torch.get_num_threads(),
            "tf32 (matmul/cudnn)": (f"{torch.backends.cuda.matmul.allow_tf32}/{torch.backends.cudnn.allow_tf32}"
                                    if device.type == "cuda" else "-")}


def format_header(head: dict) -> str:
    return " | ".join(f"{k}: {v}" for k, v in head.items())


def markdown_table(rows, columns=None) -> str:
    """A markdown table of dict rows (columns: the union of keys in first-seen order, or as given)."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def record(name: str, device, text: str) -> Path:
    """Append ``text`` to benchmarks/results/<name>-<cpu|cuda>.md (newest last)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{torch.device(device).type}.md"
    with open(path, "a") as fh:
        fh.write(text.rstrip() + "\n\n")
    return path
