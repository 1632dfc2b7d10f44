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
