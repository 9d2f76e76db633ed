"""PNG plots of the compression report: per-layer sparsity, a quantized weight's histograms, metric vs ratio.

Each ``*_figure`` function builds a :class:`matplotlib.figure.Figure` from plain data (a summary, tensors, a list
of points); each plot function writes that figure as one PNG (``FIGSIZE`` inches at ``DPI``, so
``840 x 540`` pixels) and returns the path. Figures are made through ``matplotlib.figure.Figure`` and rendered
by Agg: no ``pyplot``, no global state, the caller's backend is left untouched. The sensitivity curves are
:meth:`lightning_compress.sensitivity.SensitivityResult.plot`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, PercentFormatter
from torch import Tensor

from lightning_compress.functional.quant import sqnr_db
from lightning_compress.summary import CompressionSummary, LayerRow

FIGSIZE = (7.0, 4.5)
DPI = 120
MAX_BARS = 30  # layers shown by sparsity_bars: the largest by parameter count, in model order
FLAT_RATIOS = 1.1  # ratios within 10% of each other: metric_vs_ratio plots by stage
MAX_NAME = 36  # layer names longer than this are cut from the left ("…encoder.layer.11.output.dense")
MAX_SAMPLES = 1_000_000  # values drawn into a histogram; larger tensors are subsampled (seeded, reproducible)
MAX_GRID_LINES = 256  # quantization levels drawn as full-height lines; more become a rug along the x axis
MAX_RUG = 4096
BINS = 100
PATTERN_COLORS = {"dense": "#9e9e9e", "unstructured": "#1f77b4", "2:4": "#ff7f0e", "rows": "#2ca02c"}
OTHER_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``DPI`` (its own size, no cropping) and return the path."""
    path = Path(path)
    fig.savefig(path, format="png", dpi=DPI)
    return path


# ---------------------------------------------------------------------------------------------------- sparsity


def sparsity_bars(summary: CompressionSummary, path: str | Path) -> Path:
    """Write a PNG of per-layer sparsity bars coloured by pattern, with the model's overall sparsity as a line.

    See :func:`sparsity_figure`.
    """
    return save_png(sparsity_figure(summary), path)


def sparsity_figure(summary: CompressionSummary) -> Figure:
    """Horizontal bars: the sparsity of each layer (rows with parameters), coloured by sparsity pattern.

    At most ``MAX_BARS`` layers are drawn: the largest by parameter count, kept in model order (top to bottom); the
    title says when layers were left out. The dashed line is the sparsity over every parameter of the model.

    Raises:
        ValueError: the summary has no row with parameters.
    """
    rows = [r for r in summary.rows if r.params > 0]
    if not rows:
        raise ValueError(f"summary has no layer with parameters (got {len(summary.rows)} rows); nothing to plot")
    shown = _largest(rows, MAX_BARS)
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    handles = _draw_sparsity_bars(ax, shown)
    handles.append(ax.axvline(summary.sparsity, color="black", linestyle="--", linewidth=1))
    handles[-1].set_label(f"overall {summary.sparsity:.1%}")
    title = "per-layer sparsity"
    if len(shown) < len(rows):
        title += f" ({len(shown)} largest of {len(rows)} layers)"
    ax.set(title=title, xlabel="sparsity (% of parameters exactly zero)", xlim=(0, 1.08))
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=handles, title="pattern", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _largest(rows: Sequence[LayerRow], n: int) -> list[LayerRow]:
    """The ``n`` rows with the most parameters, in their original order."""
    keep = sorted(sorted(range(len(rows)), key=lambda i: -rows[i].params)[:n])
    return [rows[i] for i in keep]


def _draw_sparsity_bars(ax: Axes, rows: Sequence[LayerRow]) -> list[Artist]:
    """One bar per row, top to bottom, coloured by pattern, its sparsity written at the bar's end; returns one
    legend handle per pattern."""
    colors = _pattern_colors(r.pattern for r in rows)
    y = np.arange(len(rows))
    fontsize = 8 if len(rows) <= 15 else 6
    ax.barh(y, [r.sparsity for r in rows], color=[colors[r.pattern] for r in rows], height=0.75)
    for i, r in enumerate(rows):
        ax.text(r.sparsity + 0.005, i, f"{r.sparsity:.0%}", va="center", fontsize=fontsize)
    ax.set_yticks(y, [_short(r.name) for r in rows], fontsize=fontsize)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first layer on top
    return [Patch(color=color, label=pattern) for pattern, color in colors.items()]


def _pattern_colors(patterns: Iterable[str]) -> dict[str, str]:
    """A colour per distinct pattern, in order of first appearance: fixed ones for the known patterns."""
    colors: dict[str, str] = {}
    for pattern in patterns:
        if pattern not in colors:
            extra = sum(p not in PATTERN_COLORS for p in colors)
            colors[pattern] = PATTERN_COLORS.get(pattern, OTHER_COLORS[extra % len(OTHER_COLORS)])
    return colors


def _short(name: str) -> str:
    """``name`` cut from the left to ``MAX_NAME`` characters (the tail says which layer)."""
    return name if len(name) <= MAX_NAME else "…" + name[-(MAX_NAME - 1) :]


# ------------------------------------------------------------------------------------------------------- plan


def plan_bars(plan: Any, path: str | Path) -> Path:
    """Write a PNG of a :class:`~lightning_compress.budget.CompressionPlan`: see :func:`plan_figure`."""
    return save_png(plan_figure(plan), path)


def plan_figure(plan: Any) -> Figure:
    """Vertical bars, one per layer in model order: its megabytes under the plan, coloured by its option, with the
    plan's total and predicted loss increase in the title.

    Raises:
        ValueError: the plan has no layer bytes.
    """
    names = list(plan.layers)
    if not plan.layer_bytes or set(plan.layer_bytes) != set(names):
        raise ValueError("the plan has no per-layer bytes to plot (plans made by OptionScan.plan have them)")
    colors = _pattern_colors(plan.layers.values())
    fig = Figure(figsize=(max(FIGSIZE[0], len(names) * 0.05), FIGSIZE[1]), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x, [plan.layer_bytes[n] / 1e6 for n in names], color=[colors[plan.layers[n]] for n in names], width=0.9)
    step = max(1, len(names) // 20)
    ax.set_xticks(x[::step], [_short(n) for n in names[::step]], rotation=90, fontsize=6)
    ax.set(ylabel="MB under the plan", title=f"compression plan: {plan.total_bytes / 1e6:,.2f} MB, predicted loss "
           f"+{plan.predicted_loss:.3g}")  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    counts = plan.counts()
    handles = [Patch(color=c, label=f"{o} ({counts[o]})") for o, c in colors.items()]
    ax.legend(handles=handles, title="option (layers)", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# ------------------------------------------------------------------------------------------------ quantization


def quantization_histogram(
    original: Tensor,
    quantized: Tensor,
    path: str | Path,
    name: str,
    levels: Tensor | None = None,
    levels_per_channel: int | None = None,
) -> Path:
    """Write a PNG of a weight before and after quantization and of its error. See :func:`quantization_figure`."""
    return save_png(quantization_figure(original, quantized, name, levels, levels_per_channel), path)


def quantization_figure(
    original: Tensor,
    quantized: Tensor,
    name: str,
    levels: Tensor | None = None,
    levels_per_channel: int | None = None,
) -> Figure:
    """Two panels: (a) the original values' histogram, the quantized values' histogram over it and the grid of
    representable values; (b) the histogram of the error ``quantized - original``, its SQNR in the title.

    Shapes: ``original`` and ``quantized`` any shape, the same; both are flattened. Histograms draw at most
    ``MAX_SAMPLES`` values (the same seeded random positions in both); the SQNR
    (``20·log10(‖x‖ / ‖x − q‖)``, :func:`sqnr_db`) uses every value.

    Args:
        original: the float weight ``x``.
        quantized: its quantized (dequantized, e.g. ``fake_quantize``) values ``q``.
        name: the weight's name, for the title.
        levels: the representable values, any shape (e.g. ``scale * arange(qmin, qmax + 1)`` per tensor, or the
            unique quantized values per channel); default the distinct values of ``quantized``. Up to
            ``MAX_GRID_LINES`` are drawn as lines, more as a rug of ticks along the x axis.
        levels_per_channel: the code count of one channel's (or group's) grid, e.g. 256 for int8, when every channel
            has its own scale: the legend then says so, since the distinct values of all channels together are many
            more than any one channel can represent.

    Raises:
        ValueError: the shapes differ, the tensors are empty, or a value is not finite.
    """
    _check_same_shape(original, quantized, "original", "quantized")
    x, q = _finite_flat(original, "original"), _finite_flat(quantized, "quantized")
    if x.numel() == 0:
        raise ValueError(f"original and quantized must hold values, got shape {tuple(original.shape)}")
    pruned = (x == 0) & (q == 0)  # pruned weights: exact zeros before and after, they would swamp both panels
    kept = f"; {float(pruned.double().mean()):.0%} pruned zeros not drawn" if pruned.any() else ""
    if pruned.any() and not pruned.all():
        x_kept, q_kept = x[~pruned], q[~pruned]
    else:
        x_kept, q_kept = x, q
    grid = torch.unique(_finite_flat(levels, "levels") if levels is not None else q_kept)
    xs, qs = _sample(x_kept, MAX_SAMPLES), _sample(q_kept, MAX_SAMPLES)
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    dist, err = fig.subplots(1, 2)
    _draw_distributions(dist, xs.numpy(), qs.numpy(), grid.numpy(), levels_per_channel)
    _draw_error(err, (qs - xs).numpy(), sqnr_db(x, q))
    sampled = f", histograms of {xs.numel():,} sampled" if xs.numel() < x_kept.numel() else ""
    fig.suptitle(f"quantization of {name}\n({x.numel():,} values{sampled}{kept})", fontsize="medium")
    return fig


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise unless ``a`` and ``b`` have the same shape, naming both."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {name_a} {tuple(a.shape)} and "
            f"{name_b} {tuple(b.shape)}"
        )


def _finite_flat(t: Tensor, name: str) -> Tensor:
    """``t`` flattened as float64 on the CPU; raise if a value is NaN or infinite."""
    flat = t.detach().flatten().to("cpu", torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} must hold only finite values, got {int((~torch.isfinite(flat)).sum())} non-finite")
    return flat


def _sample(t: Tensor, n: int) -> Tensor:
    """At most ``n`` values of the 1-D ``t``: all of them, or ``n`` positions drawn with a fixed seed (so ``_sample``
    of two tensors of the same size picks the same positions)."""
    if t.numel() <= n:
        return t
    positions = torch.randint(t.numel(), (n,), generator=torch.Generator().manual_seed(0))
    return t[positions]


def _draw_distributions(ax: Axes, x: np.ndarray, q: np.ndarray, grid: np.ndarray, per_channel: int | None) -> None:
    """Panel (a): the original values' density, the quantized values' density and the grid of levels in view."""
    lo, hi = min(x.min(), q.min()), max(x.max(), q.max())
    pad = 0.03 * (hi - lo) or 1e-3 * max(abs(lo), 1.0)
    lo, hi = lo - pad, hi + pad
    density, *_ = ax.hist(x, bins=np.linspace(lo, hi, BINS + 1), density=True, color="#1f77b4", alpha=0.45)
    qdensity, *_ = ax.hist(q, bins=_level_cells(q), density=True, histtype="step", color="#d62728", linewidth=1.2)
    lines = _draw_grid(ax, grid[(grid >= lo) & (grid <= hi)], total=len(grid), per_channel=per_channel)
    handles = [Patch(color="#1f77b4", alpha=0.45, label="original"), Line2D([], [], color="#d62728", label="quantized")]
    ax.legend(handles=[*handles, lines], fontsize="small", loc="upper left")
    top = max(density.max(), min(qdensity.max(), 3 * density.max()))  # a spike at 0 may go off the top
    ax.set(title="(a) values", xlabel="weight value", ylabel="density", xlim=(lo, hi), ylim=(0, 1.35 * top))


def _level_cells(q: np.ndarray) -> np.ndarray:
    """Histogram bins of quantized values ``q``: one cell around each distinct value (edges halfway between
    neighbours), so that the density of ``q`` is comparable with the original's; ``BINS`` even bins when ``q``
    has more than ``MAX_GRID_LINES`` distinct values."""
    levels = np.unique(q)
    if len(levels) > MAX_GRID_LINES:
        return np.linspace(levels[0], levels[-1], BINS + 1)
    if len(levels) == 1:
        half = 1e-3 * max(abs(levels[0]), 1.0)
        return np.array([levels[0] - half, levels[0] + half])
    mid = (levels[1:] + levels[:-1]) / 2
    return np.concatenate([[2 * levels[0] - mid[0]], mid, [2 * levels[-1] - mid[-1]]])


def _draw_grid(ax: Axes, levels: np.ndarray, total: int, per_channel: int | None = None) -> LineCollection:
    """The representable values: full-height thin lines, or for more than ``MAX_GRID_LINES`` a rug of ticks."""
    label = f"grid ({total:,} levels)"
    if per_channel is not None:
        label = f"grid ({per_channel:,} levels per channel; {total:,} distinct over all channels)"
    transform = ax.get_xaxis_transform()  # x in data, y in axes fraction
    if len(levels) <= MAX_GRID_LINES:
        alpha = 0.4 if len(levels) <= 64 else 0.15
        return ax.vlines(levels, 0, 1, transform=transform, color="black", linewidth=0.4, alpha=alpha, label=label)
    if len(levels) > MAX_RUG:
        levels = levels[np.linspace(0, len(levels) - 1, MAX_RUG).round().astype(int)]
    return ax.vlines(
        levels, 0, 0.04, transform=transform, color="black", linewidth=0.4, alpha=0.6, label=f"{label}, rug"
    )


def _draw_error(ax: Axes, error: np.ndarray, sqnr: float) -> None:
    """Panel (b): histogram of ``quantized - original``, its SQNR in dB in the title."""
    ax.hist(error, bins=BINS, color="#7f7f7f")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set(title=f"(b) error, SQNR {_format_db(sqnr)}", xlabel="quantized − original", ylabel="count")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))


def _format_db(value: float) -> str:
    """``"12.34 dB"``, or ``"∞ dB (exact)"``."""
    return "∞ dB (exact)" if value == math.inf else f"{value:.2f} dB"


# ------------------------------------------------------------------------------------------- metric vs ratio


def metric_vs_ratio(
    points: Sequence[tuple[str, float, float]],
    path: str | Path,
    metric: str = "metric",
    series: Sequence[str] | None = None,
) -> Path:
    """Write a PNG of ``metric`` against compression ratio across the run's stages. See :func:`metric_figure`."""
    return save_png(metric_figure(points, metric, series), path)


def metric_figure(
    points: Sequence[tuple[str, float, float]], metric: str = "metric", series: Sequence[str] | None = None
) -> Figure:
    """The metric of each stage against its compression ratio (×, vs FP32), connected in order, each point labelled.

    The x axis is logarithmic when the ratios span more than 10×; when they span less than ``FLAT_RATIOS`` (a run
    whose compression is set from the start) the stages themselves lie along x, each labelled with its ratio.

    Args:
        points: ``(stage, ratio, metric)`` in run order, e.g. ``[("epoch 0", 1.0, 0.91), ("exported", 7.8, 0.9)]``;
            ratios positive, metrics finite.
        metric: the metric's name, for the y axis (e.g. ``"val accuracy"``).
        series: one name per point (e.g. ``"val/acc"``, ``"test/acc"``): each name is its own line, in the legend;
            None draws one line.

    Raises:
        ValueError: ``points`` is empty, or a ratio is not positive and finite, or a metric is not finite, or
            ``series`` does not have one name per point.
    """
    stages, ratios, values = _check_points(points)
    names = list(series) if series is not None else [metric] * len(points)
    if len(names) != len(points):
        raise ValueError(f"series must name every point: got {len(names)} names for {len(points)} points")
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    if max(ratios) / min(ratios) < FLAT_RATIOS:  # the ratio barely moves: stages along x, ratios in the labels
        _plot_series(ax, list(range(len(values))), values, names)
        ax.set_xticks(range(len(values)), [f"{st}\n{r:.2f}×" for st, r in zip(stages, ratios, strict=True)])
        ax.tick_params(axis="x", labelsize="small")
        ax.margins(x=0.1, y=0.15)
        ax.set(title=f"{metric} at each stage", xlabel="stage and compression ratio vs FP32", ylabel=metric)
        ax.grid(alpha=0.3)
        return fig
    _plot_series(ax, ratios, values, names)
    for i, (stage, r, v) in enumerate(zip(stages, ratios, values, strict=True)):
        offset = (6, 6) if i % 2 == 0 else (6, -12)  # alternate so that neighbours at one ratio stay readable
        ax.annotate(stage, (r, v), xytext=offset, textcoords="offset points", fontsize="small")
    if max(ratios) / min(ratios) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.margins(x=0.15, y=0.15)
    ax.set(title=f"{metric} vs compression ratio", xlabel="compression ratio vs FP32 (×)", ylabel=metric)
    ax.grid(alpha=0.3, which="both")
    return fig


def _plot_series(ax: Axes, xs: Sequence[float], values: Sequence[float], names: Sequence[str]) -> None:
    """One connected line per distinct name (in order of appearance), with a legend when there are several."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for k, name in enumerate(dict.fromkeys(names)):
        idx = [i for i, n in enumerate(names) if n == name]
        ax.plot([xs[i] for i in idx], [values[i] for i in idx], color=colors[k % len(colors)], marker="o",
                linewidth=1.2, markersize=5, label=name)  # fmt: skip
    if len(set(names)) > 1:
        ax.legend(fontsize="small")


def _check_points(points: Sequence[tuple[str, float, float]]) -> tuple[list[str], list[float], list[float]]:
    """Split ``points`` into stages, ratios and metrics, validating each."""
    if not points:
        raise ValueError("points must hold at least one (stage, ratio, metric), got an empty list")
    stages, ratios, values = [], [], []
    for stage, r, v in points:
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"point {stage!r}: ratio must be positive and finite, got {r!r}")
        if not math.isfinite(v):
            raise ValueError(f"point {stage!r}: metric must be finite, got {v!r}")
        stages.append(str(stage))
        ratios.append(float(r))
        values.append(float(v))
    return stages, ratios, values
