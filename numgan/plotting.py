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


# Figs. 12-14: hyper-parameter sweeps (learning rate, gamma), one panel of IS curves per architecture
def sweep_panels(axes, results, panels: dict, key: str = "is_mean", window: int = 1, cmap: str = "viridis",
                 ylabel: str = "Inception Score", legend_title: str = ""):
    """Curves of a grid of runs, one panel per group (Figs. 12-14: IS for a learning-rate or gamma sweep).

    Args:
        axes: one matplotlib axis per entry of ``panels`` (e.g. ``fig.subplots(1, len(panels))``).
        results: {run id: result dict} as returned by ``numgan.experiments.run``; every id named in
            ``panels`` must be a key.
        panels: {panel title: {curve label: run id}}. Curves are drawn in the given order and the i-th
            curve of every panel gets the same colour from ``cmap`` (so an ordered sweep reads the same
            way in every panel).
        key: the result entry to plot (``is_mean``, ``fid``, ``loss_d``, ``loss_g``).
        window: trailing smoothing window (:func:`smooth`); with ``window > 1`` the raw curve is drawn
            faintly behind the smoothed one (spec 1.6 [DEFAULT]: raw plus a 5-point smoothed copy).
        legend_title: title of each panel's legend (e.g. "learning rate").
    Diverged runs are drawn up to their divergence and marked (:func:`plot_curve`).
    Returns {panel title: {curve label: line}}.
    """
    import matplotlib.pyplot as plt

    n = max((len(c) for c in panels.values()), default=1)
    colors = plt.get_cmap(cmap)(np.linspace(0.05, 0.85, n)) if n > 1 else [plt.get_cmap(cmap)(0.3)]
    return _curve_panels("sweep_panels", axes, results, panels, lambda i, label: (colors[i], label), key,
                         window, ylabel, legend_title)


# Figs. 5, 7-8: iteration axes as 0, 50k, 100k, ... (150k-iteration runs)
def _kilo_ticks(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))


# Figs. 7-8: Inception Score against iterations, one panel per architecture, one curve per method
def is_panels(axes, results, panels: dict, key: str = "is_mean", window: int = 1,
              ylabel: str = "Inception Score"):
    """Method comparison, one panel per architecture (Figs. 7 and 8: SimGA, AltGA, ConOpt and the
    smoothing optimiser on the four architectures of Fig. 6, without / with the extra FC layer in D).

    Args:
        axes: one matplotlib axis per entry of ``panels`` (e.g. ``fig.subplots(2, 2, sharey=True)``).
        results: {run id: result dict} as returned by ``numgan.experiments.run``.
        panels: {panel title: {method: run id}}, ``method`` a key of :data:`PALETTE` / :data:`LABELS`
            ("simga", "altga", "conopt", "smooth"), which fixes its colour and legend label in every
            panel. Curves are drawn in the given order.
        key: the result entry to plot (``is_mean``, ``fid``).
        window: trailing smoothing window (:func:`smooth`); with ``window > 1`` the raw curve is drawn
            faintly behind the smoothed one (spec 1.6 [DEFAULT]: raw plus a 5-point smoothed copy).
    Diverged runs are drawn up to their divergence and marked (:func:`plot_curve`).
    Returns {panel title: {method: line}}.
    """
    unknown = sorted({m for curves in panels.values() for m in curves} - set(PALETTE))
    if unknown:
        raise ValueError(f"is_panels: unknown method(s) {unknown}; use keys of PALETTE: {sorted(PALETTE)}")
    return _curve_panels("is_panels", axes, results, panels, lambda i, method: (PALETTE[method], LABELS[method]),
                         key, window, ylabel)


def _curve_panels(caller: str, axes, results, panels: dict, style, key: str, window: int, ylabel: str,
                  legend_title: str = ""):
    """Shared loop of :func:`sweep_panels` and :func:`is_panels`: one panel per entry of ``panels``
    ({title: {name: run id}}); ``style(i, name) -> (colour, legend label)`` for the i-th curve."""
    axes = list(np.atleast_1d(axes).ravel())
    if len(axes) != len(panels):
        raise ValueError(f"{caller}: {len(panels)} panels but {len(axes)} axes")
    missing = sorted({rid for curves in panels.values() for rid in curves.values()} - set(results))
    if missing:
        raise ValueError(f"{caller}: no result for run id(s) {missing}; run them with numgan.experiments.run")
    lines = {}
    for ax, (title, curves) in zip(axes, panels.items()):
        lines[title] = {}
        for i, (name, rid) in enumerate(curves.items()):
            color, label = style(i, name)
            if window > 1:
                plot_curve(ax, results[rid], key, label="_raw", color=color, alpha=0.25, lw=0.8)
            lines[title][name] = plot_curve(ax, results[rid], key, label=label, color=color, window=window, lw=1.6)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.legend(title=legend_title or None, fontsize=8, title_fontsize=8)
        _kilo_ticks(ax)
    return lines


# Figs. 5 and 11: losses and Inception Score of a ConOpt run and an AltGA run, overlaid
def loss_is_panels(axes, results, runs: dict, window: int = 1) -> str:
    """(a) discriminator loss and (b) generator loss against iterations (the raw logged losses, spec
    1.6), (c) Inception Score against iterations and, when a fourth axis is given, (d) the Inception
    Score against the accumulated training wall-clock (spec Fig. 5 [DEFAULT]: iterations primary,
    wall-clock secondary; the wall-clock depends on the device the runs were trained on).

    Args:
        axes: 3 or 4 matplotlib axes.
        results: {run id: result dict} as returned by ``numgan.experiments.run``.
        runs: {method: run id}, ``method`` a key of :data:`PALETTE` / :data:`LABELS`. Curves are drawn
            in the given order: put the run with the larger fluctuations first so the other stays visible.
        window: trailing smoothing window of the IS curves (raw drawn faintly behind when > 1).
    Returns the wall-clock unit used on (d): "s", "min" or "h" ("" with 3 axes).
    """
    axes = list(np.atleast_1d(axes).ravel())
    if len(axes) not in (3, 4):
        raise ValueError(f"loss_is_panels: needs 3 or 4 axes, got {len(axes)}")
    missing = sorted(set(runs.values()) - set(results))
    if missing:
        raise ValueError(f"loss_is_panels: no result for run id(s) {missing}")
    unit = ""
    if len(axes) == 4:
        longest = max((float(np.max(results[r]["wall_clock"], initial=0.0)) for r in runs.values()), default=0.0)
        unit, div = ("s", 1.0) if longest < 600 else (("min", 60.0) if longest < 36_000 else ("h", 3600.0))
    for method, rid in runs.items():
        res, color, label = results[rid], PALETTE[method], LABELS[method]
        for ax, key in zip(axes[:2], ("loss_d", "loss_g")):
            plot_curve(ax, res, key, label=label, color=color, lw=0.6, alpha=0.85)
        views = [(axes[2], res, "eval_iters")]
        if unit:
            views.append((axes[3], {**res, "wall_clock": np.asarray(res["wall_clock"], float) / div}, "wall_clock"))
        for ax, r, x in views:
            if window > 1:
                plot_curve(ax, r, "is_mean", label="_raw", color=color, x=x, alpha=0.25, lw=0.8)
            plot_curve(ax, r, "is_mean", label=label, color=color, x=x, window=window, lw=1.6)
    titles = ["(a) discriminator loss", "(b) generator loss", "(c) Inception Score", "(d) Inception Score"]
    ylabels = ["$L_D$", "$L_G$", "Inception Score", "Inception Score"]
    xlabels = ["iteration"] * 3 + [f"training wall-clock [{unit}]"]
    for ax, t, yl, xl in zip(axes, titles, ylabels, xlabels):
        ax.set_title(t, fontsize=11)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=8)
    for ax in axes[:3]:
        _kilo_ticks(ax)
    return unit
