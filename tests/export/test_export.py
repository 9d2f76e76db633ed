"""export_for_inference, save_exported, load_exported: faithful to the compressed model, reloaded in a fresh process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import GPTQFinalize, IterativePruning, QATFakeQuant, SmoothQuantCalibrate
from lightning_compress.export.int4_linear import Int4Linear
from lightning_compress.export.int8_linear import Int8Linear
from lightning_compress.export.io import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS_FILE,
    exported_layers,
    load_exported,
    save_exported,
)
from lightning_compress.export.layer import ExportedLinear
from lightning_compress.export.plan import export_for_inference
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.nn.fake_quant import FakeQuantLinear, WeightQuantizer
from tests.conftest import sqnr_db
from tests.tiny_models import tiny_bert, token_batches

ROOT = Path(__file__).resolve().parents[2]


class MLP(pl.LightningModule):
    """A small classifier whose Linears all have input sizes divisible by 8 (2:4 and int8 everywhere)."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _data(n: int = 256) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 16, (n,), generator=g)), 32)


def _fit(callbacks, epochs: int = 2) -> MLP:
    pl.seed_everything(0)
    model = MLP()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, _data())
    return model.eval()


def _inputs() -> torch.Tensor:
    return torch.randn(40, 64, generator=torch.Generator().manual_seed(5))


def _copy_of(model: MLP) -> MLP:
    """A deep copy that keeps the fake-quant layers (deepcopy of the whole LightningModule)."""
    import copy

    return copy.deepcopy(model)


FRESH = """
import sys, torch
from safetensors.torch import load_file, save_file
from lightning_compress.export import load_exported
from tests.export.test_export import MLP
model = load_exported(sys.argv[1], MLP())
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"y": model(x).contiguous()}, sys.argv[3])
"""


def _predict_in_fresh_process(path: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    save_file({"x": x}, tmp_path / "x.safetensors")
    cmd = [sys.executable, "-c", FRESH, str(path), str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(tmp_path / "y.safetensors")["y"]


def _check_faithful_and_reload(model: MLP, layer_class: type, tmp_path: Path) -> None:
    """Reference export == the compressed model exactly; fast export within 40 dB; fresh process predicts the same."""
    x = _inputs()
    with torch.no_grad():
        expected = model(x)
        reference = export_for_inference(_copy_of(model), prefer="reference")
        assert all(isinstance(m, layer_class) for m in exported_layers(reference).values())
        assert torch.equal(reference(x), expected)
        fast = export_for_inference(model, tokens=64)
        y = fast(x)
    assert sqnr_db(expected, y) >= 40
    path = save_exported(fast, tmp_path / "exported")
    assert torch.equal(_predict_in_fresh_process(path, x, tmp_path), y)


def test_qat_model_exports_faithfully_and_reloads_in_a_fresh_process(tmp_path):
    model = _fit([QATFakeQuant(bits=8, act_bits=8)])
    _check_faithful_and_reload(model, Int8Linear, tmp_path)


def test_gptq_model_exports_int4_and_reloads_in_a_fresh_process(tmp_path):
    model = _fit([], epochs=1)
    GPTQFinalize(bits=4, group_size=16).apply(model, [x for x, _ in _data(128)])
    _check_faithful_and_reload(model, Int4Linear, tmp_path)
    assert all(m.spec()["group_size"] == 16 for m in exported_layers(model).values())


@pytest.mark.parametrize("qat", [False, True])
def test_24_pruned_model_exports_sparse_layers_and_reloads(tmp_path, qat):
    prune = IterativePruning(method="nm", pattern="2:4", schedule="oneshot")
    model = _fit([prune, QATFakeQuant(bits=8)] if qat else [prune])
    _check_faithful_and_reload(model, SemiStructuredSparseLinear, tmp_path)
    report = model.export_report
    assert all("2:4" in r.layout for r in report.layers)
    if not torch.cuda.is_available():  # no 2:4 kernel on CPU: the self-check computes densely and says so
        assert all(r.kernel != "sparse" and "2:4 kernel unavailable on cpu" in r.note for r in report.layers)


def test_smoothquant_bert_exports_exactly_on_the_reference_path():
    model = tiny_bert().eval()
    batches = token_batches(4)
    SmoothQuantCalibrate(alpha=0.5).apply(model, batches)
    with torch.no_grad():
        expected = model(**batches[0]).last_hidden_state
        export_for_inference(model, prefer="reference")
        assert torch.equal(model(**batches[0]).last_hidden_state, expected)
    assert any(m.smooth is not None for m in exported_layers(model).values())  # explicit smoothing kept


def test_plain_model_dynamic_int8_and_bfloat16_rest():
    torch.manual_seed(0)
    model = MLP().eval()
    x = _inputs()
    with torch.no_grad():
        expected = model(x)
        export_for_inference(model, weights="int8", dtype="bfloat16", tokens=64)
        y = model(x.bfloat16())
    assert y.dtype == torch.bfloat16 and sqnr_db(expected, y.float()) >= 30
    layers = exported_layers(model)
    assert len(layers) == 3 and all(isinstance(m, Int8Linear) for m in layers.values())
    assert all(m.weight_scale.dtype == torch.float32 for m in layers.values())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


@pytest.mark.parametrize(("weights", "prune", "limit"), [("int4", False, 0.14), ("int8", True, 0.16)])
def test_bytes_on_disk(tmp_path, weights, prune, limit):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    save_file(model.state_dict(), tmp_path / "fp32.safetensors")
    fp32 = (tmp_path / "fp32.safetensors").stat().st_size
    if prune:
        from lightning_compress.functional.masks import nm_mask

        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(nm_mask(m.weight, 2, 4))
    export_for_inference(model, weights=weights, prefer="memory", tokens=16)
    ratio = _dir_bytes(save_exported(model, tmp_path / "out")) / fp32
    assert ratio <= limit, ratio


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.body = nn.Linear(32, 32)
            self.head = nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))

    model = Tied().eval()
    export_for_inference(model, weights="int8", ignore="head", tokens=16)
    path = save_exported(model, tmp_path / "tied")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["aliases"] == {"head.weight": "emb.weight"}
    ids = torch.randint(0, 50, (3, 7))
    fresh = load_exported(path, Tied())
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    assert fresh.head.weight.data_ptr() == fresh.emb.weight.data_ptr()


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": "int2"}, "weights='int2' is not supported"),
        ({"sparsity": "1:4"}, "sparsity='1:4' is not supported"),
        ({"prefer": "fast"}, "prefer='fast' is not supported"),
        ({"dtype": "float64"}, "dtype='float64' is not supported"),
        ({"tokens": 0}, "tokens must be a positive int"),
        ({}, "nothing to export"),
        ({"weights": "int8", "sparsity": "2:4"}, "sparsity='2:4' but layer 'net.0' is not 2:4 sparse"),
        ({"weights": "int8", "targets": "nope"}, "match no layer"),
        ({"weights": "int4", "group_size": 100}, "layer 'net.0': group_size=100 does not divide its input width 64"),
        ({"weights": "int4", "group_size": 0}, "group_size must be a positive int or None, got 0"),
    ],
)
def test_bad_arguments_leave_the_model_untouched(kwargs, match):
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        export_for_inference(model, **kwargs)
    assert not exported_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_exporting_twice_says_so():
    model = export_for_inference(MLP().eval(), weights="int8", tokens=16)
    with pytest.raises(ValueError, match="model is already exported"):
        export_for_inference(model, weights="int8", tokens=16)


def test_a_layer_that_cannot_be_exported_stops_everything_before_any_change():
    model = MLP()
    lin = model.net[2]
    model.net[2] = FakeQuantLinear.from_module(lin, WeightQuantizer(lin.weight, bits=8, group_size=16))
    with pytest.raises(ValueError, match="layer 'net.2': int8 weights with group_size=16"):
        export_for_inference(model, weights="int8")
    assert isinstance(model.net[0], nn.Linear) and not exported_layers(model)


def test_kmeans_layers_are_refused():
    model = MLP()
    lin = model.net[0]
    model.net[0] = FakeQuantLinear.from_module(lin, WeightQuantizer(lin.weight, bits=4, method="kmeans"))
    with pytest.raises(ValueError, match="k-means"):
        export_for_inference(model)


@pytest.fixture
def saved(tmp_path):
    model = export_for_inference(MLP().eval(), weights="int8", tokens=16)
    return save_exported(model, tmp_path / "m")


def test_truncated_file_is_reported(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_exported(saved, MLP())


def test_corrupt_file_of_the_right_size_is_reported(saved):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # header length beyond the file
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_exported(saved, MLP())


def test_missing_tensor_is_reported(saved):
    from safetensors.torch import load_file

    tensors = load_file(saved / WEIGHTS_FILE)
    del tensors["net.2.weight_scale"]
    save_file(tensors, saved / WEIGHTS_FILE)
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["file_bytes"] = (saved / WEIGHTS_FILE).stat().st_size
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"missing tensors \['net.2.weight_scale'\]"):
        load_exported(saved, MLP())


def test_newer_format_version_is_reported(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["version"] = FORMAT_VERSION + 1
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="newer than this lightning_compress reads"):
        load_exported(saved, MLP())


def test_missing_manifest_and_other_architecture_are_reported(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        load_exported(tmp_path, MLP())
    with pytest.raises(ValueError, match=r"layer 'net.0' is Linear\(in_features=64, out_features=96.* but 64 → 128"):
        load_exported(saved, MLP(width=96))
    with pytest.raises(ValueError, match="does not exist"):
        load_exported(saved, nn.Sequential(nn.Linear(64, 16)))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


class WiderHead(MLP):
    """The MLP with its last layer of another shape (it stays float in the file: only the first two are exported)."""

    def __init__(self) -> None:
        super().__init__()
        self.net[4] = nn.Linear(64, 10)


class ExtraLayer(MLP):
    """The MLP plus a Linear the saved file knows nothing about."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(16, 16)


@pytest.mark.parametrize(
    ("make", "match"), [(WiderHead, r"tensor 'net\.4\.(bias|weight)' has shape"), (ExtraLayer, "missing tensors")]
)
def test_a_model_that_does_not_fit_is_left_whole(tmp_path, make, match):
    saved = save_exported(export_for_inference(MLP().eval(), weights="int8", targets=r"net\.[02]", tokens=16), tmp_path)
    model = make()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        load_exported(saved, model)
    assert not exported_layers(model) and _untouched(model, before)


def test_flipped_bytes_inside_the_tensor_data_are_reported(saved):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header, min(len(data), header + 1000)):
        data[i] ^= 0x5A
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))  # same size: only the checksums can tell
    model = MLP()
    before = _state(model)
    with pytest.raises(ValueError, match="do not match their checksums: the file is corrupt"):
        load_exported(saved, model)
    assert _untouched(model, before)


def test_truncated_manifest_is_a_value_error_naming_the_file(saved):
    text = (saved / MANIFEST).read_text()
    (saved / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON \(truncated or corrupt\)"):
        load_exported(saved, MLP())


def test_a_version_1_file_without_checksums_still_loads(saved, caplog):
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest["sha256"]
    manifest["version"] = 1
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        load_exported(saved, MLP())
    assert "integrity not verified" in caplog.text


def test_save_writes_no_temporary_files(saved):
    assert sorted(p.name for p in saved.iterdir()) == [MANIFEST, WEIGHTS_FILE]


def test_save_refuses_a_model_that_was_not_exported(tmp_path):
    with pytest.raises(ValueError, match="call export_for_inference"):
        save_exported(MLP(), tmp_path)


# ------------------------------------------------------------------------------------------------ self-check
def test_self_check_rejects_a_kernel_that_disagrees_with_the_reference(monkeypatch):
    zeros = lambda self, x, kernel: torch.zeros(x.shape[0], self.out_features)  # noqa: E731
    monkeypatch.setattr(Int8Linear, "_kernel_forward", zeros)
    model = export_for_inference(MLP().eval(), weights="int8", tokens=16)
    for row in model.export_report.layers:
        assert row.kernel in ("float", "reference") and row.small_kernel is None
        fast = [k for k in Int8Linear.KERNELS if k not in ("float", "reference")]
        rejected = [k for k in fast if f"{k} rejected (SQNR" in row.note]
        assert rejected == [k for k in fast if k in model.get_submodule(row.name).available_kernels()]
        assert "int8" in rejected


def test_self_check_keeps_dense_where_the_sparse_kernel_is_slower(monkeypatch):
    import time

    def slow_sparse(self, x, kernel):
        time.sleep(0.01)
        return self.reference(x)

    monkeypatch.setattr(SemiStructuredSparseLinear, "available_kernels", lambda self: ["reference", "float", "sparse"])
    monkeypatch.setattr(SemiStructuredSparseLinear, "_prepare", ExportedLinear._prepare)
    monkeypatch.setattr(SemiStructuredSparseLinear, "_kernel_forward", slow_sparse)
    prune = IterativePruning(method="nm", pattern="2:4", schedule="oneshot")
    model = export_for_inference(_fit([prune], epochs=1), tokens=16)
    for row in model.export_report.layers:
        assert row.kernel == "float" and row.note.startswith("2:4 kept dense: sparse at")
        assert row.times_ms["sparse"] > row.times_ms["float"]
    assert "2:4 kept dense" in model.export_report.to_markdown()


def test_real_token_counts_come_from_example_inputs():
    model = export_for_inference(MLP().eval(), weights="int8", example_inputs=torch.randn(3, 5, 64))
    assert [r.tokens for r in model.export_report.layers] == [15, 15, 15]


# ------------------------------------------------------------------------------------------------ the script
@pytest.mark.slow
def test_export_script_from_a_checkpoint_and_recipe(tmp_path):
    base = [sys.executable, "scripts/train.py", "trainer.enable_progress_bar=false", "+compress=[prune_24,qat_int8]"]
    train = subprocess.run(base + [f"hydra.run.dir={tmp_path / 'train'}", "trainer.max_epochs=2", "test=false"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "scripts/export.py", "+compress=[prune_24,qat_int8]", f"ckpt_path={ckpt}",
           f"hydra.run.dir={tmp_path / 'export'}", "trainer.enable_progress_bar=false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("output cosine"))
    same, total = re.search(r"top-1 agreement 1\.0000 \((\d+) of (\d+)\)$", line).groups()
    assert float(line.split()[6].rstrip(";")) >= 0.9999 and same == total and int(total) > 0
    path = tmp_path / "export" / "exported"
    manifest = json.loads((path / MANIFEST).read_text())
    assert {n: v["class"] for n, v in manifest["layers"].items()} == {
        "net.0": "Int8Conv2d",  # QAT convs with static input ranges: int8 (the 2:4 one stores its zeros densely)
        "net.2": "Int8Conv2d",
        "net.6": "SemiStructuredSparseLinear",  # the Linears are 2:4 + int8
        "net.8": "SemiStructuredSparseLinear",
    }
    from lightning_compress.examples.models import ImageClassifier, SmallCNN

    model = load_exported(path, ImageClassifier(SmallCNN()))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
