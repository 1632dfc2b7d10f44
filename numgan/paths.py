"""Absolute paths of the project, overridable by environment variables.

ROOT     the repository root
DATA     where datasets live              (env NUMGAN_DATA, default ROOT/data)
RUNS     the run cache and checkpoints    (env NUMGAN_RUNS, default ROOT/runs)
FIGURES  committed full-scale figures     (ROOT/figures)
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "figures"


def data_dir() -> Path:
    """Dataset root: $NUMGAN_DATA or <repo>/data."""
    return Path(os.environ.get("NUMGAN_DATA", ROOT / "data")).expanduser()


def runs_dir() -> Path:
    """Run cache root: $NUMGAN_RUNS or <repo>/runs (git-ignored)."""
    return Path(os.environ.get("NUMGAN_RUNS", ROOT / "runs")).expanduser()


def figure_dir(scale: str, out_dir: str = "") -> Path:
    """Where a notebook writes its figure: `out_dir` if given, figures/ at full scale,
    runs/<scale>/figures otherwise (reduced-scale figures are never committed)."""
    if out_dir:
        path = Path(out_dir)
    elif scale == "full":
        path = FIGURES
    else:
        path = runs_dir() / scale / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path
