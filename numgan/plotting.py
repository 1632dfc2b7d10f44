"""Shared plotting helpers: one style, one savefig (PNG + PDF), sample grids. No computation here."""
from pathlib import Path

import matplotlib
import numpy as np

PALETTE = {"simga": "#d62728", "altga": "#1f77b4", "conopt": "#2ca02c", "smooth": "#9467bd", "clip": "#8c564b"}
LABELS = {"simga": "SimGA", "altga": "AltGA", "conopt": "ConOpt", "smooth": "Smoothing", "clip": "Clipping"}


def use_style() -> None:
    """Seaborn 'ticks' style with a readable font size, used by every notebook."""
    import seaborn as sns

    sns.set_theme(style="ticks", context="notebook", font_scale=1.0)
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight"})


def savefig(fig, name: str, fig_dir) -> list[Path]:
    """Write ``fig`` as ``<fig_dir>/<name>.png`` and ``.pdf``; returns the paths."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        path = fig_dir / f"{name}.{ext}"
        fig.savefig(path, metadata={"CreationDate": None} if ext == "pdf" else None)
        out.append(path)
    return out


def image_grid(images, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """Tile images [N, C, H, W] (float in [-1, 1] or uint8) into one HxWxC array in [0, 1]."""
    x = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else (np.clip(x, -1, 1) + 1) / 2
    n, c, h, w = x.shape
    ncol = nrow
    nrows = int(np.ceil(n / ncol))
    grid = np.ones((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    grid = grid.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


# ------------------------------------------------------------------ image-GAN figures (Figs. 4-14)
def smooth(y, window: int = 1) -> np.ndarray:
    """Trailing rolling mean over ``window`` points (the authors' eval.py; spec 1.6 [DEFAULT] 1 and 5),
    ignoring NaNs."""
    y = np.asarray(y, dtype=float)
    if window <= 1 or len(y) == 0:
        return y
    out = np.empty_like(y)
    for i in range(len(y)):
        seg = y[max(0, i - window + 1): i + 1]
        out[i] = np.nanmean(seg) if np.isfinite(seg).any() else np.nan
    return out


def _outcome(result) -> str:
    status = str(result.get("status", "ok"))
    if status == "diverged":
        return f"diverged at {int(result['diverged_at']):,}"
    return status


def plot_curve(ax, result, key: str = "is_mean", label: str = "", color=None, window: int = 1,
               x: str = "eval_iters", **kw):
    """One run's curve (``is_mean``, ``fid``, ``loss_d``, ``loss_g``) against iterations (or ``wall_clock``).
    A diverged run is drawn up to its divergence and marked with an 'x' and "(diverged at k)" in the label."""
    xs = np.asarray(result["log_iters"] if key.startswith("loss") else result[x], dtype=float)
    ys = smooth(result[key], window)
    n = min(len(xs), len(ys))
    xs, ys = xs[:n], ys[:n]
    text = label
    if str(result.get("status")) == "diverged":
        text = f"{label} ({_outcome(result)})"
    (line,) = ax.plot(xs, ys, label=text, color=color, **kw)
    if str(result.get("status")) == "diverged":
        finite = np.isfinite(ys)
        if finite.any():
            i = np.flatnonzero(finite)[-1]
            ax.plot(xs[i], ys[i], marker="x", color=line.get_color(), ms=9, mew=2)
    return line


def show_grid(ax, result, index: int = -1, title: str = "", nrow: int = 8):
    """Show the sample grid of evaluation ``index`` (default: the last) of a run; a run that diverged
    before its first evaluation shows its outcome instead."""
    ax.set_xticks([]), ax.set_yticks([])
    grids = result.get("grids")
    if grids is None or len(grids) == 0:
        ax.text(0.5, 0.5, f"no samples\n({_outcome(result)})", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.imshow(image_grid(grids[index], nrow=nrow), interpolation="nearest")
        it = int(np.asarray(result.get("grid_iters", result["eval_iters"]))[index])
        title = f"{title}\n(iteration {it:,}{'; ' + _outcome(result) if result.get('status') == 'diverged' else ''})"
    ax.set_title(title, fontsize=10)


def scale_note(fig, scale: str, results) -> None:
    """Stamp reduced-scale figures: which data and which feature network were used. Full-scale figures
    from real data and the Inception network get no stamp."""
    results = list(results.values()) if isinstance(results, dict) else list(results)
    data = sorted({str(r.get("data_source", "?")) for r in results})
    metric = sorted({str(r.get("metric_source", "?")) for r in results})
    if scale == "full" and "synthetic" not in data:
        return
    note = f"{scale.upper()} SCALE (not the paper's result): data = {', '.join(data)}; scores = {', '.join(metric)}"
    fig.text(0.5, -0.02, note, ha="center", va="top", fontsize=8, color="firebrick")
