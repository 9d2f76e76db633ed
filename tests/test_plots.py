import ast
import math
import re
from pathlib import Path

import matplotlib
import matplotlib.image
import pytest
import torch
from torch import nn

import lightning_compress.plots as plots
from lightning_compress.functional.masks import nm_mask
from lightning_compress.functional.quant import compute_qparams, fake_quantize, quant_range
from lightning_compress.plots import (
    metric_figure,
    metric_vs_ratio,
    quantization_figure,
    quantization_histogram,
    sparsity_bars,
    sparsity_figure,
    sqnr_db,
)
from lightning_compress.summary import CompressionSummary, LayerRow, compression_summary
from tests.conftest import sqnr_db as reference_sqnr_db

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PIXELS = (round(plots.FIGSIZE[1] * plots.DPI), round(plots.FIGSIZE[0] * plots.DPI))  # (540, 840)
STAGES = [("epoch 0", 1.0, 0.91), ("epoch 3", 4.2, 0.90), ("after PTQ", 16.5, 0.885), ("exported", 16.0, 0.885)]


def _assert_png(path: Path) -> None:
    """A real PNG of the expected pixel size, not a blank one."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == PIXELS
    assert image[..., :3].std() > 0.05  # something is drawn


@pytest.fixture(autouse=True)
def _backend_unchanged():
    before = matplotlib.get_backend()
    yield
    assert matplotlib.get_backend() == before


def _row(i: int, params: int, pattern: str, sparsity: float) -> LayerRow:
    nonzero = round(params * (1 - sparsity))
    name = f"encoder.layer.{i}.attention.output.dense"
    shape = (params // 16, 16)
    return LayerRow(
        name=name, kind="Linear", shape=shape, pattern=pattern, params=params, nonzero=nonzero, bits=8,
        fp32_bytes=params * 4.0, bytes=float(params),
    )  # fmt: skip


def _model_summary() -> CompressionSummary:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 10))
    with torch.no_grad():
        model[2].weight.mul_(nm_mask(model[2].weight, 2, 4))
        model[4].weight[model[4].weight.abs() < 0.05] = 0.0
    return compression_summary(model)


def _per_channel_int4(shape=(64, 96)) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.linspace(0.1, 1.0, shape[0])[:, None]
    scale, _ = compute_qparams(w, 4, axis=0)
    return w, fake_quantize(w, scale, None, 4)


def test_sqnr_db_hand_value_and_formula():
    x, y = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])
    assert sqnr_db(x, y) == pytest.approx(20 * math.log10(5.0), abs=1e-12)
    assert sqnr_db(x, y) == pytest.approx(13.9794, abs=1e-4)
    w, q = _per_channel_int4()
    assert sqnr_db(w, q) == pytest.approx(reference_sqnr_db(w, q), abs=1e-4)
    assert sqnr_db(w, w) == math.inf


def test_sqnr_db_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        sqnr_db(torch.zeros(2), torch.zeros(3))


def test_plots_module_never_imports_pyplot():
    tree = ast.parse(Path(plots.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any("pyplot" in name for name in imported)


def test_sparsity_bars_of_a_model_summary(tmp_path):
    summary = _model_summary()
    path = sparsity_bars(summary, tmp_path / "sparsity.png")
    assert path == tmp_path / "sparsity.png"
    _assert_png(path)
    fig = sparsity_figure(summary)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "2", "3", "4"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["dense", "2:4", "unstructured", f"overall {summary.sparsity:.1%}"]
    bars = [p.get_width() for p in ax.patches]
    assert bars == pytest.approx([r.sparsity for r in summary.rows])


def test_sparsity_bars_with_150_layers_shows_the_largest(tmp_path):
    patterns = ("dense", "unstructured", "2:4", "rows", "channels")
    rows = [_row(i, 160 * (1 + (i * 37) % 50), patterns[i % 5], (i % 10) / 10) for i in range(150)]
    summary = CompressionSummary(rows)
    _assert_png(sparsity_bars(summary, tmp_path / "many.png"))
    (ax,) = sparsity_figure(summary).axes
    assert ax.get_title() == f"per-layer sparsity ({plots.MAX_BARS} largest of 150 layers)"
    shown = [t.get_text() for t in ax.get_yticklabels()]
    largest = sorted(rows, key=lambda r: -r.params)[: plots.MAX_BARS]
    assert len(shown) == plots.MAX_BARS
    assert all(min(r.params for r in largest) >= r.params for r in rows if r not in largest)
    assert shown == [plots._short(r.name) for r in rows if r in largest]  # model order
    assert all(len(label) <= plots.MAX_NAME for label in shown)


def test_sparsity_bars_without_parameters_raises(tmp_path):
    with pytest.raises(ValueError, match="no layer with parameters"):
        sparsity_bars(CompressionSummary([]), tmp_path / "empty.png")


def test_quantization_histogram_per_channel_int4(tmp_path):
    w, q = _per_channel_int4()
    path = quantization_histogram(w, q, tmp_path / "q.png", name="fc1.weight")
    assert path == tmp_path / "q.png"
    _assert_png(path)
    fig = quantization_figure(w, q, name="fc1.weight")
    values, error = fig.axes
    shown = float(re.search(r"SQNR (-?[\d.]+) dB", error.get_title()).group(1))
    assert shown == pytest.approx(reference_sqnr_db(w, q), abs=0.005)
    assert error.get_title() == f"(b) error, SQNR {sqnr_db(w, q):.2f} dB"
    assert "fc1.weight" in fig.get_suptitle()
    distinct = len(torch.unique(q))
    assert distinct > plots.MAX_GRID_LINES  # 64 channels x up to 16 levels: drawn as a rug
    assert f"grid ({distinct:,} levels), rug" in [t.get_text() for t in values.get_legend().get_texts()]


def test_quantization_histogram_per_tensor_grid_from_levels(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(3, 8, 5, 5)  # a conv weight: any shape is flattened
    scale, _ = compute_qparams(w, 4)
    q = fake_quantize(w, scale, None, 4)
    qmin, qmax = quant_range(4)
    levels = scale.flatten() * torch.arange(qmin, qmax + 1)
    _assert_png(quantization_histogram(w, q, tmp_path / "conv.png", name="conv.weight", levels=levels))
    values, _ = quantization_figure(w, q, name="conv.weight", levels=levels).axes
    grid = next(c for c in values.collections if c.get_label().startswith("grid"))
    assert grid.get_label() == "grid (16 levels)"
    drawn = sorted(float(seg[0][0]) for seg in grid.get_segments())
    in_view = [float(v) for v in levels if values.get_xlim()[0] <= v <= values.get_xlim()[1]]
    assert drawn == pytest.approx(in_view)


def test_quantization_histogram_default_grid_is_the_distinct_quantized_values():
    w, q = _per_channel_int4(shape=(4, 64))
    values, _ = quantization_figure(w, q, name="small").axes
    distinct = len(torch.unique(q))
    assert distinct <= plots.MAX_GRID_LINES
    assert f"grid ({distinct} levels)" in [t.get_text() for t in values.get_legend().get_texts()]


def test_quantization_histogram_subsamples_large_tensors(monkeypatch):
    monkeypatch.setattr(plots, "MAX_SAMPLES", 1_000)
    w, q = _per_channel_int4(shape=(64, 96))
    fig = quantization_figure(w, q, name="big")
    assert "6,144 values, histograms of 1,000 sampled" in fig.get_suptitle()
    values, error = fig.axes
    assert sum(p.get_height() for p in error.patches) == 1_000
    again = quantization_figure(w, q, name="big").axes[1]
    assert [p.get_height() for p in again.patches] == [p.get_height() for p in error.patches]  # deterministic
    assert error.get_title() == f"(b) error, SQNR {sqnr_db(w, q):.2f} dB"  # SQNR over every value


def test_quantization_histogram_rejects_mismatched_shapes_and_non_finite(tmp_path):
    with pytest.raises(ValueError, match=r"original \(4, 6\) and quantized \(24,\)"):
        quantization_histogram(torch.zeros(4, 6), torch.zeros(24), tmp_path / "x.png", name="w")
    bad = torch.ones(4)
    bad[1] = math.nan
    with pytest.raises(ValueError, match="quantized must hold only finite values"):
        quantization_histogram(torch.ones(4), bad, tmp_path / "x.png", name="w")
    assert not (tmp_path / "x.png").exists()


def test_metric_vs_ratio_labels_every_stage_in_order(tmp_path):
    path = metric_vs_ratio(STAGES, tmp_path / "metric.png", metric="val accuracy")
    assert path == tmp_path / "metric.png"
    _assert_png(path)
    (ax,) = metric_figure(STAGES, metric="val accuracy").axes
    assert [t.get_text() for t in ax.texts] == [s for s, _, _ in STAGES]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [r for _, r, _ in STAGES]
    assert list(line.get_ydata()) == [m for _, _, m in STAGES]
    assert ax.get_xscale() == "log"  # 1x .. 16.5x spans more than 10x
    assert ax.get_ylabel() == "val accuracy" and "×" in ax.get_xlabel()


def test_metric_vs_ratio_linear_when_ratios_span_less_than_10x(tmp_path):
    _assert_png(metric_vs_ratio(STAGES[:2], tmp_path / "m.png"))
    (ax,) = metric_figure(STAGES[:2]).axes
    assert ax.get_xscale() == "linear"
    assert metric_figure([("exported", 3.9, 0.5)]).axes[0].get_xscale() == "linear"  # one point


@pytest.mark.parametrize(
    ("points", "message"),
    [([], "at least one"), ([("a", 0.0, 1.0)], "ratio must be positive"), ([("a", 2.0, math.nan)], "finite")],
)
def test_metric_vs_ratio_rejects_bad_points(tmp_path, points, message):
    with pytest.raises(ValueError, match=message):
        metric_vs_ratio(points, tmp_path / "m.png")


def test_per_channel_grids_are_labelled_per_channel_not_by_their_union():
    w, q = _per_channel_int4()
    values, _ = quantization_figure(w, q, name="fc1.weight", levels_per_channel=16).axes
    distinct = len(torch.unique(q))
    labels = [t.get_text() for t in values.get_legend().get_texts()]
    assert f"grid (16 levels per channel; {distinct:,} distinct over all channels), rug" in labels


def test_metric_series_are_separate_lines_with_a_legend():
    points = [("epoch 0", 1.0, 0.90), ("epoch 1", 4.0, 0.95), ("test", 4.0, 0.93)]
    ax = metric_figure(points, "acc", series=["val/acc", "val/acc", "test/acc"]).axes[0]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    assert lines == {"val/acc": [0.90, 0.95], "test/acc": [0.93]}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["val/acc", "test/acc"]
    with pytest.raises(ValueError, match="series must name every point"):
        metric_figure(points, "acc", series=["val/acc"])
