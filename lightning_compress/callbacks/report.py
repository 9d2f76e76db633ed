"""CompressionReport: writes the compression summary of the trained model into the run directory."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from lightning_compress.summary import CompressionSummary, compression_summary, stage_markdown, stage_sizes

log = logging.getLogger(__name__)


class CompressionReport(pl.Callback):
    """Write ``compression_summary.md`` (per layer: parameters, sparsity, bits, bytes; total ratio against FP32)
    at the end of fit and of test, and log the totals to the Trainer's logger.

    YAML (``conf/callbacks/default.yaml``)::

        compression_report:
          _target_: lightning_compress.CompressionReport
          filename: compression_summary.md

    Python::

        trainer = L.Trainer(callbacks=[CompressionReport()])

    Args:
        dirpath: where to write; defaults to ``trainer.default_root_dir`` (the Hydra run directory in
            ``scripts/train.py``).
        filename: the markdown file's name.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "compression_summary.md") -> None:
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.dirpath = dirpath
        self.filename = filename
        self.summary: CompressionSummary | None = None
        self.stages: dict[str, float] | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module)

    def path(self, trainer: pl.Trainer) -> Path:
        """The summary file this callback writes for ``trainer``."""
        return Path(self.dirpath or trainer.default_root_dir) / self.filename

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.summary = compression_summary(pl_module)
        shared = any(getattr(getattr(m, "weight_format", None), "codebook_size", None) for m in pl_module.modules())
        self.stages = stage_sizes(pl_module) if shared else None
        self._write(trainer, self.summary)

    def to_markdown(self) -> str:
        """The last report: the per-layer table, plus Deep Compression's stage sizes when weights share codebooks."""
        text = self.summary.to_markdown() if self.summary is not None else ""
        if self.stages is not None:
            text += "\n\nSize after each Deep Compression stage:\n\n" + stage_markdown(self.stages)
        return text

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, summary: CompressionSummary) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Compression summary\n\n" + self.to_markdown() + "\n")
        log.info("compression summary written to %s", path)
        if trainer.logger is not None:
            metrics = {"compression/ratio_vs_fp32": summary.ratio, "compression/sparsity": summary.sparsity}
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
