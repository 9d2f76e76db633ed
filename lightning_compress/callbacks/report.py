"""CompressionReport: what happened to the model, at a glance — ``report.md`` and PNG plots in the run directory.

The report holds the per-layer summary (shape, parameters, sparsity, pattern, bits, bytes; totals and the ratio
against FP32 and FP16), the monitored metric at each stage of the run next to the compression ratio, optional
"fits on a GPU of N GB" lines for a parameter count you scale to, and three or more plots: per-layer sparsity,
weight histograms against the quantization grid with the reconstruction error, the metric against the
compression ratio across stages. :func:`write_report` is the same report for any model (``scripts/export.py``
writes one after exporting).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from lightning_compress import plots
from lightning_compress.budget import CompressionPlan
from lightning_compress.callbacks.auto import AutoCompress
from lightning_compress.export.layer import ExportedLayer
from lightning_compress.functional.quant import compute_qparams, fake_quantize
from lightning_compress.functional.size import ratio
from lightning_compress.nn.fake_quant import is_fake_quant
from lightning_compress.nn.select import is_default_layer
from lightning_compress.sensitivity import SensitivityResult
from lightning_compress.summary import CompressionSummary, compression_summary, stage_markdown, stage_sizes

log = logging.getLogger(__name__)

DEFAULT_GPUS = (24.0, 40.0, 80.0)
REPORT = "report.md"


@dataclass(frozen=True)
class Stage:
    """The model at one point of the run: its compression (ratio against FP32, sparsity) and the metric then."""

    name: str
    ratio: float
    sparsity: float
    metric: float | None = None
    split: str = "val"


def stage_of(model: nn.Module, name: str, metric: float | None = None, split: str = "val") -> Stage:
    """A :class:`Stage` named ``name`` from ``model``'s current compression summary; ``split`` says which data the
    metric was measured on (``"val"``, ``"test"``): each split is its own line and plot series."""
    summary = compression_summary(model)
    return Stage(name, summary.ratio, summary.sparsity, metric, split)


def metric_label(monitor: str | None, split: str) -> str:
    """The metric's name on ``split``: ``"val/acc"`` on ``"test"`` is ``"test/acc"``; other names get the split."""
    name = monitor or "metric"
    if split == "val":
        return name
    return name.replace("val", split, 1) if "val" in name else f"{name} ({split})"


# ------------------------------------------------------------------------------------------------ weights to plot
def largest_layers(model: nn.Module, n: int) -> list[str]:
    """Names of the ``n`` Linear / Conv / exported layers with the most weights (fake-quant layers first)."""
    layers = [(name, m) for name, m in model.named_modules() if is_default_layer(m) or isinstance(m, ExportedLayer)]

    def size(m: nn.Module) -> int:
        return m.dequantized_weight().numel() if isinstance(m, ExportedLayer) else m.weight.numel()

    layers.sort(key=lambda item: (not is_fake_quant(item[1]), -size(item[1])))
    return [name for name, _ in layers[:n]]


def weight_snapshots(model: nn.Module, n: int = 3) -> dict[str, Tensor]:
    """Float32 CPU copies of the weights of :func:`largest_layers` (the "before" of the quantization plots)."""
    out = {}
    for name in largest_layers(model, n):
        module = model.get_submodule(name)
        if not isinstance(module, ExportedLayer):
            out[name] = module.weight.detach().float().cpu().clone()
    return out


def quantized_views(
    model: nn.Module, snapshots: Mapping[str, Tensor], n: int = 3
) -> list[tuple[str, Tensor, Tensor, int | None]]:
    """``(title, original, quantized, levels per channel)`` weights to plot: fake-quant and exported layers against
    their snapshot (or their own float weight); with no quantized layer, an int8 round-to-nearest preview of the
    largest layer (per output channel) shows what int8 would do to it. The level count is that of one channel's
    grid when each output channel has one scale (None for groups, a k-means codebook or float values)."""
    views = []
    for name in largest_layers(model, n):
        module = model.get_submodule(name)
        with torch.no_grad():
            if is_fake_quant(module):
                original = snapshots.get(name, module.weight.detach().float().cpu())
                quantized = module.fake_quantized_weight().detach().float().cpu()
                wq = module.weight_quantizer
                per_channel = 2**wq.bits if wq.method == "linear" and wq.group_size is None else None
                views.append((f"{name} (int{wq.bits})", original, quantized, per_channel))
            elif isinstance(module, ExportedLayer) and name in snapshots:
                bits = module.weight_bits
                grouped = getattr(module, "group_size", module.in_features) != module.in_features
                title = f"{name} ({type(module).__name__})"
                per_channel = 2**bits if bits <= 8 and not grouped else None
                views.append((title, snapshots[name], module.dequantized_weight().cpu(), per_channel))
    if views:
        return views
    largest = largest_layers(model, 1)
    if not largest or isinstance(model.get_submodule(largest[0]), ExportedLayer):
        return []
    name = largest[0]
    w = model.get_submodule(name).weight.detach().float().cpu()
    s, _ = compute_qparams(w, 8, symmetric=True, axis=0)
    return [(f"{name} (int8 round-to-nearest preview)", w, fake_quantize(w, s, None, 8), 256)]


# ------------------------------------------------------------------------------------------------ the report
def fits_lines(summary: CompressionSummary, scale_params: float, gpus: Sequence[float]) -> list[str]:
    """ "Fits on" lines for a model of ``scale_params`` parameters stored like this one (weights only)."""
    lines = []
    for label, bytes_per_param in (
        ("FP32", 4.0),
        ("FP16", 2.0),
        ("as compressed here", summary.bytes / summary.params),
    ):
        total = scale_params * bytes_per_param
        fits = [f"{g:g} GB {'yes' if total <= g * 1e9 else 'no'}" for g in gpus]
        lines.append(f"- {label}: {total / 1e9:.2f} GB of weights — fits on " + ", ".join(fits))
    return lines


def report_markdown(
    summary: CompressionSummary,
    stages: Sequence[Stage],
    monitor: str | None,
    plot_paths: Sequence[Path],
    scale_params: float | None = None,
    gpus: Sequence[float] = DEFAULT_GPUS,
    extra: str = "",
) -> str:
    """The text of ``report.md``: totals, stages, fits-on lines, the per-layer table, the plots."""
    fp16 = ratio(summary.fp32_bytes / 2, summary.bytes)
    lines = [
        "# Compression report",
        "",
        f"**{summary.params:,} parameters in {summary.bytes:,.0f} bytes: {summary.ratio:.2f}× the compression of "
        f"FP32 ({fp16:.2f}× against FP16); {summary.sparsity:.1%} of the weights are zero.**",
        "",
    ]
    splits = list(dict.fromkeys(s.split for s in stages if s.metric is not None))
    for split in splits:
        measured = [s for s in stages if s.metric is not None and s.split == split]
        first, last = measured[0], measured[-1]
        change = f"{first.metric:.4f} ({first.name}) → " if len(measured) > 1 else ""
        lines.append(f"{metric_label(monitor, split)}: {change}{last.metric:.4f} ({last.name})")
    lines += [""] if splits else []
    if stages:
        heads = [metric_label(monitor, split) for split in splits or ["val"]]
        lines += [f"| stage | vs FP32 | sparsity | {' | '.join(heads)} |", "|---|---:|---:|" + "---:|" * len(heads)]
        for s in stages:
            cells = [f"{s.metric:.4f}" if s.metric is not None and s.split == sp else "–" for sp in splits or ["val"]]
            lines.append(f"| {s.name} | {s.ratio:.2f}× | {s.sparsity:.1%} | {' | '.join(cells)} |")
        lines.append("")
    if scale_params:
        lines += [f"At {scale_params:,.0f} parameters (weights only; activations and caches not included):", ""]
        lines += fits_lines(summary, scale_params, gpus) + [""]
    lines += ["## Layers", "", summary.to_markdown(), ""]
    if extra:
        lines += [extra, ""]
    if plot_paths:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plot_paths] + [""]
    return "\n".join(lines)


def write_report(
    model: nn.Module,
    dirpath: str | Path,
    stages: Sequence[Stage] = (),
    monitor: str | None = None,
    snapshots: Mapping[str, Tensor] | None = None,
    scale_params: float | None = None,
    gpus: Sequence[float] = DEFAULT_GPUS,
    histograms: int = 3,
    extra: str = "",
    sensitivity: SensitivityResult | None = None,
    plan: CompressionPlan | None = None,
    measured_loss_increase: float | None = None,
) -> list[Path]:
    """Write ``report.md`` and its PNG plots for ``model`` into ``dirpath``.

    Args:
        model: any model (plain, fake-quant, pruned or exported).
        dirpath: the run directory (created if needed).
        stages: the run's stages, oldest first (metric against compression ratio).
        monitor: the metric's name, for the headings.
        snapshots: float weights from before quantization (:func:`weight_snapshots`), for the histograms.
        scale_params: a parameter count to scale the model's storage to for the "fits on" lines, or None.
        gpus: GPU memory sizes in GB for those lines.
        histograms: how many layers get a weight histogram.
        extra: more markdown appended after the layer table.
        sensitivity: a pruning-sensitivity scan to plot (``sensitivity.png``, one curve per layer) and tabulate.
        plan: a compression plan to chart (``plan.png``, each layer's bytes coloured by its option) and tabulate,
            with ``measured_loss_increase``, the loss increase measured after applying it.

    Returns:
        The paths written: ``report.md`` first, then the plots.
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    summary = compression_summary(model)
    paths = [plots.sparsity_bars(summary, dirpath / "sparsity.png")]
    for i, (title, original, quantized, per_channel) in enumerate(quantized_views(model, snapshots or {}, histograms)):
        path = dirpath / f"weights_{i}.png"
        paths.append(plots.quantization_histogram(original, quantized, path, title, levels_per_channel=per_channel))
    if stages:
        measured = [s for s in stages if s.metric is not None]
        if measured:
            points = [(s.name, s.ratio, s.metric) for s in measured]
            series = [metric_label(monitor, s.split) for s in measured]
            paths.append(plots.metric_vs_ratio(points, dirpath / "metric_vs_ratio.png", monitor or "metric", series))
    if sensitivity is not None:
        paths.append(sensitivity.plot(dirpath / "sensitivity.png"))
        extra = "\n\n".join(t for t in (extra, "## Sensitivity\n\n" + sensitivity.to_markdown()) if t)
    if plan is not None:
        paths.append(plan.plot(dirpath / "plan.png"))
        extra = "\n\n".join(t for t in (extra, "## Plan\n\n" + plan.to_markdown(measured_loss_increase)) if t)
    report = dirpath / REPORT
    report.write_text(report_markdown(summary, stages, monitor, paths, scale_params, gpus, extra))
    log.info("compression report written to %s", report)
    return [report, *paths]


# ------------------------------------------------------------------------------------------------ the callback
class CompressionReport(pl.Callback):
    """Leave ``report.md`` and PNG plots in the run directory after fit (and after test), and log them.

    Tracks a stage per validation epoch (compression ratio, sparsity, the monitored metric), snapshots the largest
    layers' float weights at the end of training (before QAT converts and post-training recipes quantize at fit
    end), and writes the report once every fit-end hook has run (``teardown``), then again after ``test`` with the
    test metric. Images go to the logger when it takes them (TensorBoard ``add_image``, ``log_image`` loggers);
    the totals are logged as metrics. Only rank 0 writes.

    YAML (``conf/callbacks/default.yaml``)::

        compression_report:
          _target_: lightning_compress.CompressionReport
          scale_params: 7.0e9      # optional: "fits on 24 / 40 / 80 GB" lines for a 7B model stored like this one

    Python::

        trainer = L.Trainer(callbacks=[IterativePruning(method="nm"), QATFakeQuant(bits=8), CompressionReport()])

    Args:
        dirpath: where to write; defaults to ``trainer.default_root_dir`` (the Hydra run directory in
            ``scripts/train.py``).
        monitor: the logged metric to track; None picks the first validation metric whose name holds "acc".
        scale_params: a parameter count for the "fits on GPU" lines, or None for none.
        gpus: GPU memory sizes in GB for those lines.
        histograms: how many of the largest layers get a weight-histogram plot.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        monitor: str | None = None,
        scale_params: float | None = None,
        gpus: Sequence[float] = DEFAULT_GPUS,
        histograms: int = 3,
    ) -> None:
        if scale_params is not None and (isinstance(scale_params, bool) or not float(scale_params) > 0):
            raise ValueError(f"scale_params must be a positive parameter count or None, got {scale_params!r}")
        if not gpus or any(isinstance(g, bool) or not float(g) > 0 for g in gpus):
            raise ValueError(f"gpus must be positive GPU memory sizes in GB, got {gpus!r}")
        if isinstance(histograms, bool) or not isinstance(histograms, int) or histograms < 0:
            raise ValueError(f"histograms must be a non-negative int, got {histograms!r}")
        self.dirpath, self.monitor = dirpath, monitor
        self.scale_params = None if scale_params is None else float(scale_params)
        self.gpus, self.histograms = tuple(float(g) for g in gpus), histograms
        self.stages: list[Stage] = []
        self.snapshots: dict[str, Tensor] = {}
        self.summary: CompressionSummary | None = None
        self.deep_compression: dict[str, float] | None = None

    def path(self, trainer: pl.Trainer) -> Path:
        """The ``report.md`` this callback writes for ``trainer``."""
        return Path(self.dirpath or trainer.default_root_dir) / REPORT

    def _metric(self, trainer: pl.Trainer, prefix: str) -> float | None:
        metrics = trainer.callback_metrics
        if self.monitor is None:
            found = [k for k in metrics if k.startswith("val") and "acc" in k]
            self.monitor = found[0] if found else None
        if self.monitor is None:
            return None
        key = self.monitor if prefix == "val" else self.monitor.replace("val", prefix, 1)
        value = metrics.get(key)
        return None if value is None else float(value)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            metric = self._metric(trainer, "val")
            self.stages.append(stage_of(pl_module, f"epoch {trainer.current_epoch}", metric))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshots = weight_snapshots(pl_module, self.histograms)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.stages.append(stage_of(pl_module, "fit end"))
            self._report(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stages.append(stage_of(pl_module, "test", self._metric(trainer, "test"), split="test"))
        self._report(trainer, pl_module)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.summary = compression_summary(pl_module)
        shared = any(getattr(getattr(m, "weight_format", None), "codebook_size", None) for m in pl_module.modules())
        self.deep_compression = stage_sizes(pl_module) if shared else None
        self._write(trainer, pl_module)

    def to_markdown(self) -> str:
        """The last per-layer table, plus Deep Compression's stage sizes when weights share codebooks."""
        text = self.summary.to_markdown() if self.summary is not None else ""
        if self.deep_compression is not None:
            text += "\n\n" + self._deep_compression_text()
        return text

    def _deep_compression_text(self) -> str:
        return "Size after each Deep Compression stage:\n\n" + stage_markdown(self.deep_compression)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extra = self._deep_compression_text() if self.deep_compression is not None else ""
        done = [c for c in trainer.callbacks if isinstance(c, AutoCompress) and c.measured_loss_increase is not None]
        auto = done[0] if done else None
        paths = write_report(pl_module, self.path(trainer).parent, self.stages, self.monitor, self.snapshots,
                             self.scale_params, self.gpus, self.histograms, extra,
                             plan=None if auto is None else auto.plan,
                             measured_loss_increase=None if auto is None else auto.measured_loss_increase)  # fmt: skip
        summary = self.summary
        for logger in trainer.loggers:
            logger.log_metrics({"compression/ratio_vs_fp32": summary.ratio, "compression/sparsity": summary.sparsity},
                               step=trainer.global_step)  # fmt: skip
            log_images(logger, paths[1:], trainer.global_step)


def log_images(logger: object, paths: Sequence[Path], step: int) -> None:
    """Send PNGs to a logger that takes images: TensorBoard's ``experiment.add_image`` or a ``log_image`` method
    (W&B, Neptune style); loggers without images (CSV) keep just the files in the run directory."""
    experiment = getattr(logger, "experiment", None)
    for path in paths:
        tag = f"compression/{path.stem}"
        if hasattr(experiment, "add_image"):
            from matplotlib.image import imread

            experiment.add_image(tag, imread(path)[..., :3], step, dataformats="HWC")
        elif hasattr(logger, "log_image"):
            logger.log_image(key=tag, images=[str(path)], step=step)
