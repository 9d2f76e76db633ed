"""CompressionReport: report.md and its plots match the model (sparsity from the weights, bytes from the size
accounting); images reach loggers that take them; write_report on exported models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from lightning_compress import CompressionReport, IterativePruning, QATFakeQuant, export_for_inference
from lightning_compress.callbacks.report import Stage, fits_lines, log_images, write_report
from lightning_compress.summary import compression_summary
from tests.callbacks.test_pruning import fit
from tests.ddp import CloseProcessGroup

PNG = b"\x89PNG\r\n\x1a\n"


def _totals(text: str) -> tuple[int, float, float]:
    """(parameters, bytes, sparsity %) from the report's headline."""
    m = re.search(r"\*\*([\d,]+) parameters in ([\d,]+) bytes: .*; ([\d.]+)% of the weights are zero", text)
    assert m, text[:400]
    return int(m[1].replace(",", "")), float(m[2].replace(",", "")), float(m[3])


def _layer_row(text: str, name: str) -> list[str]:
    row = next(ln for ln in text.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_report_numbers_match_the_model_and_plots_are_written(tmp_path):
    report = CompressionReport(dirpath=str(tmp_path), scale_params=7e9)
    callbacks = [IterativePruning(sparsity=0.6), QATFakeQuant(bits=4), report]
    trainer, model = fit(callbacks, max_epochs=2, tmp_path=tmp_path)
    text = (tmp_path / "report.md").read_text()
    # totals: parameters, zeros that pruning made (weights that merely round to code 0 are not pruned), bytes from
    # the size accounting
    params = sum(p.numel() for p in model.parameters())
    masks = callbacks[0].masks
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    assert zeros < sum(int((p == 0).sum()) for p in model.parameters())  # int4 rounding made more zeros
    n, size, sparsity = _totals(text)
    assert n == params and sparsity == pytest.approx(100 * zeros / params, abs=0.05)
    assert size == pytest.approx(compression_summary(model).bytes, abs=0.5)
    w = model.get_parameter("net.6.weight")
    row = _layer_row(text, "net.6")  # the row counts the weight and its (dense) bias together
    assert row[4] == f"{1 - (int(masks['net.6.weight'].sum()) + 64) / (w.numel() + 64):.1%}" and row[6] == "4"
    # stages: one per validation epoch with the logged metric, then fit end
    stages = [ln for ln in text.splitlines() if ln.startswith("| epoch ") or ln.startswith("| fit end |")]
    assert [s.split("|")[1].strip() for s in stages] == ["epoch 0", "epoch 1", "fit end"]
    assert f"{float(trainer.callback_metrics['val/acc']):.4f}" in stages[1]
    # fits-on lines at 7e9 parameters, stored like this model
    per_param = compression_summary(model).bytes / params
    assert f"as compressed here: {7e9 * per_param / 1e9:.2f} GB of weights" in text
    assert "- FP32: 28.00 GB of weights — fits on 24 GB no, 40 GB yes, 80 GB yes" in text
    # plots: written, referenced, real PNGs; at least three
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert {"sparsity.png", "metric_vs_ratio.png"} <= set(linked) and len(linked) >= 3
    for name in linked:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "compression/ratio_vs_fp32" in metrics


def test_test_stage_carries_the_test_metric(tmp_path):
    report = CompressionReport(dirpath=str(tmp_path))
    trainer, model = fit([report], max_epochs=1, tmp_path=tmp_path)
    from lightning_compress.examples.images import DigitsDataModule

    result = trainer.test(model, DigitsDataModule(), verbose=False)[0]
    assert report.stages[-1].name == "test" and report.stages[-1].metric == pytest.approx(result["test/acc"])
    text = (tmp_path / "report.md").read_text()
    assert "| test | 1.00× | 0.0% |" in text


def test_validation_and_test_metrics_are_separate_lines_columns_and_series(tmp_path, monkeypatch):
    from lightning_compress import plots
    from lightning_compress.examples.images import DigitsDataModule

    drawn = []
    monkeypatch.setattr(plots, "metric_figure", lambda points, metric, series: drawn.append(series) or Figure())
    report = CompressionReport(dirpath=str(tmp_path))
    trainer, model = fit([report], max_epochs=2, tmp_path=tmp_path)
    test_acc = trainer.test(model, DigitsDataModule(), verbose=False)[0]["test/acc"]
    val = [s for s in report.stages if s.metric is not None and s.split == "val"]
    text = (tmp_path / "report.md").read_text()
    assert f"val/acc: {val[0].metric:.4f} (epoch 0) → {val[-1].metric:.4f} (epoch 1)" in text
    assert f"test/acc: {test_acc:.4f} (test)" in text
    assert "| stage | vs FP32 | sparsity | val/acc | test/acc |" in text
    assert f"| test | 1.00× | 0.0% | – | {test_acc:.4f} |" in text
    assert drawn[-1] == ["val/acc", "val/acc", "test/acc"]  # two series in the plot, not one line through all


class ImageLogger:
    """A logger whose experiment takes images, as TensorBoard's SummaryWriter does (``add_image``)."""

    def __init__(self) -> None:
        self.images: list[tuple[str, tuple[int, ...], int, str]] = []
        self.experiment = self

    def add_image(self, tag, img, step, dataformats):
        self.images.append((tag, tuple(img.shape), step, dataformats))


def test_images_go_to_loggers_that_take_them(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    paths = write_report(model, tmp_path, [Stage("a", 1.0, 0.0, 0.5), Stage("b", 1.0, 0.0, 0.7)])
    logger = ImageLogger()
    log_images(logger, paths[1:], step=3)
    assert [t for t, *_ in logger.images] == [f"compression/{p.stem}" for p in paths[1:]]
    assert all(shape[2] == 3 and fmt == "HWC" and step == 3 for _, shape, step, fmt in logger.images)


def test_exported_model_report_counts_stored_bytes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    before = {"0": model[0].weight.detach().clone(), "2": model[2].weight.detach().clone()}
    export_for_inference(model, weights="int8", tokens=8)
    write_report(model, tmp_path, snapshots=before)
    text = (tmp_path / "report.md").read_text()
    _, size, _ = _totals(text)
    assert size == sum(m.storage_bytes() for m in (model[0], model[2]))
    assert _layer_row(text, "0")[1] == "Int8Linear"
    assert (tmp_path / "weights_0.png").read_bytes().startswith(PNG)  # snapshot against the int8 weights


def test_fits_lines_scale_the_stored_bytes_per_parameter():
    summary = compression_summary(nn.Linear(100, 10, bias=False))  # 1,000 FP32 weights: 4 bytes each
    assert fits_lines(summary, 10e9, (24, 48))[0] == "- FP32: 40.00 GB of weights — fits on 24 GB no, 48 GB yes"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale_params": -1}, "scale_params must be a positive"),
        ({"gpus": []}, "gpus must be positive"),
        ({"histograms": -1}, "histograms must be a non-negative int"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionReport(**kwargs)


@pytest.mark.slow
def test_ddp_two_processes_write_one_complete_report(tmp_path):
    import lightning.pytorch as pl

    from lightning_compress.examples.images import DigitsDataModule
    from tests.callbacks.test_pruning import Classifier

    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
                         callbacks=[IterativePruning(sparsity=0.5), CompressionReport(dirpath=str(tmp_path)),
                                    CloseProcessGroup()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Classifier(), DigitsDataModule())
    text = (tmp_path / "report.md").read_text()
    assert [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith(("| epoch", "| fit end"))] == [
        "epoch 0", "epoch 1", "fit end",
    ]  # fmt: skip
    _, _, sparsity = _totals(text)
    assert sparsity == pytest.approx(50.0, abs=2.0)  # the pruned layers at 50%, biases dense
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["metric_vs_ratio.png", "sparsity.png", "weights_0.png"]
