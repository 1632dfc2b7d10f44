"""Run cache: heavy runs are keyed by their configuration, so re-plotting is instant.

Layout: ``<runs>/<group>/<name>-<key>/`` with ``config.json`` (the full configuration),
``result.npz`` (arrays) + ``result.json`` (scalars, strings, lists) and a ``DONE`` marker written last.
Only a directory with ``DONE`` is a cache hit. Results are written to temporary files and renamed
(``os.replace``), so an interrupted run never leaves a half-written result behind; a run that
checkpoints keeps its checkpoints in the same directory and resumes from them.

``key`` = sha1 of the canonical JSON of the configuration plus ``CACHE_VERSION`` (bump it by hand
when training semantics change). Device, output folder and the like must stay out of the config.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import paths

CACHE_VERSION = 1


def config_key(cfg: dict) -> str:
    """Ten hex digits identifying ``cfg`` (JSON-serialisable, keys sorted)."""
    blob = json.dumps(cfg, sort_keys=True, default=str) + f"|v{CACHE_VERSION}"
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def run_path(group: str, name: str, cfg: dict, root=None) -> Path:
    """Directory of the run ``name`` with configuration ``cfg`` (not created)."""
    return Path(root or paths.runs_dir()) / group / f"{name}-{config_key(cfg)}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file and ``os.replace`` (checkpoints of long runs)."""
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_result(path: Path, result: dict) -> None:
    """Save a flat result dict: numpy arrays (and lists of numbers) to npz, the rest to json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, {}
    for k, v in result.items():
        if isinstance(v, np.ndarray):
            arrays[k] = v
        elif hasattr(v, "detach"):  # torch tensor
            arrays[k] = v.detach().cpu().numpy()
        else:
            meta[k] = v
    tmp = path / "result.npz.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path / "result.npz")
    atomic_write_bytes(path / "result.json", json.dumps(meta, indent=1, default=_jsonable).encode())


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"result value of type {type(x).__name__} is not JSON-serialisable")


def load_result(path: Path) -> dict:
    """Inverse of :func:`save_result`."""
    path = Path(path)
    out = json.loads((path / "result.json").read_text())
    with np.load(path / "result.npz", allow_pickle=False) as z:
        out.update({k: z[k] for k in z.files})
    return out


def is_done(path: Path) -> bool:
    return (Path(path) / "DONE").exists()


def cached(group: str, name: str, cfg: dict, fn: Callable[[Path], dict], force: bool = False,
           root=None) -> dict:
    """Return the result of ``fn(run_dir)`` for ``cfg``, computing it only if no finished run exists.

    ``fn`` receives the run directory (for checkpoints) and returns a flat dict of arrays/scalars.
    ``force=True`` discards a finished result *and* any checkpoints and recomputes.
    """
    path = run_path(group, name, cfg, root)
    if force and path.exists():
        shutil.rmtree(path)
    if is_done(path):
        return load_result(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / "config.json", json.dumps(cfg, indent=1, sort_keys=True, default=str).encode())
    result = fn(path)
    save_result(path, result)
    (path / "DONE").touch()
    return load_result(path)


def read_config(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())
