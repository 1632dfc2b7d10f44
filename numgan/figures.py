"""Command-line entry point: run the figure notebooks through papermill at a chosen scale.

    numgan-figures                          # every figure at smoke scale (CPU, minutes)
    numgan-figures --figures 2 3 --scale full --device cuda
    numgan-figures --figures 5 --scale full --device cuda --n-iters 3000   # a preview of a full-settings run

Executed notebooks go to ``runs/<scale>/notebooks/`` (never over the tracked, output-free notebooks);
figures go to ``figures/`` at full scale and ``runs/<scale>/figures/`` otherwise (or ``--out-dir``).
Runs are cached by configuration, so re-running only re-plots.
"""
import argparse
import re
import sys
import time
from pathlib import Path

from . import paths

NOTEBOOKS = paths.ROOT / "notebooks"


def notebooks() -> dict[int, Path]:
    """{figure number: notebook path} for notebooks/figNN_*.ipynb."""
    out = {}
    for nb in sorted(NOTEBOOKS.glob("fig[0-9][0-9]_*.ipynb")):
        out[int(re.match(r"fig(\d+)_", nb.name).group(1))] = nb
    return out


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    available = notebooks()
    ap = argparse.ArgumentParser(prog="numgan-figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--figures", nargs="+", default=["all"],
                    help=f"figure numbers or 'all' (available: {', '.join(map(str, available))})")
    ap.add_argument("--scale", default="smoke", choices=["smoke", "full"])
    ap.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="retrain even when cached runs exist")
    ap.add_argument("--out-dir", default="", help="where figures go (default: figures/ at full scale)")
    ap.add_argument("--n-iters", type=int, default=0,
                    help="override the iterations of the image runs (previews); notebooks without it ignore it")
    ap.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    args = ap.parse_args(argv)

    if args.figures == ["all"]:
        chosen = sorted(available)
    else:
        try:
            chosen = [int(f) for f in args.figures]
        except ValueError:
            ap.error(f"--figures takes numbers or 'all', got {args.figures}")
        missing = [f for f in chosen if f not in available]
        if missing:
            ap.error(f"no notebook for figure(s) {missing}; available: {sorted(available)}")
    try:
        import papermill as pm
    except ImportError:
        ap.error("papermill is not installed: pip install -e '.[notebooks]'")

    device = _device(args.device)
    out_nb = paths.runs_dir() / args.scale / "notebooks"
    out_nb.mkdir(parents=True, exist_ok=True)
    failed = []
    for k, fig in enumerate(chosen, 1):
        nb = available[fig]
        params = dict(scale=args.scale, device=device, seed=args.seed, force=args.force, out_dir=args.out_dir)
        declared = {p for p in pm.inspect_notebook(str(nb))}
        if args.n_iters and "n_iters" in declared:
            params["n_iters"] = args.n_iters
        params = {k2: v for k2, v in params.items() if k2 in declared}
        target = out_nb / nb.name
        print(f"[{k}/{len(chosen)}] Figure {fig}: {nb.name} (scale={args.scale}, device={device})", flush=True)
        t0 = time.time()
        try:
            pm.execute_notebook(str(nb), str(target), parameters=params, kernel_name=args.kernel,
                                cwd=str(NOTEBOOKS), progress_bar=True)
            print(f"    done in {time.time() - t0:.0f} s -> {target}", flush=True)
        except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
            failed.append(fig)
            print(f"    FAILED after {time.time() - t0:.0f} s: {str(exc).splitlines()[0] if str(exc) else exc}\n"
                  f"    the executed notebook with the error is {target}", flush=True)
    where = paths.figure_dir(args.scale, args.out_dir)
    print(f"figures in {where}; executed notebooks in {out_nb}")
    if failed:
        print(f"failed: figures {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
