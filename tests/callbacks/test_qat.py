"""QATFakeQuant in real Trainer runs: swap, convert, evaluate after fit, checkpoints, resume, DDP, bad input."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import IterativePruning, QATFakeQuant
from lightning_compress.examples.images import DigitsDataModule
from lightning_compress.examples.models import ImageClassifier, SmallCNN
from lightning_compress.functional.masks import sparsity_pattern
from lightning_compress.functional.quant import dequantize, quantize
from lightning_compress.nn.fake_quant import is_fake_quant
from lightning_compress.nn.observers import MinMaxObserver, MSEObserver, PercentileObserver
from tests.ddp import CloseProcessGroup

LAYERS = ["net.0", "net.2", "net.6", "net.8"]


def trainer(callbacks, max_epochs=1, **kwargs):
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def fit(callbacks, max_epochs=1, model=None, ckpt_path=None, **kwargs):
    pl.seed_everything(0)
    model = model or ImageClassifier(SmallCNN())
    t = trainer(callbacks, max_epochs, **kwargs)
    t.fit(model, DigitsDataModule(), ckpt_path=ckpt_path)
    return t, model


def assert_on_grid(cb: QATFakeQuant, model: nn.Module) -> None:
    for name in LAYERS:
        out, w = cb.quantized[name].weight, model.get_parameter(f"{name}.weight")
        zero_point = torch.zeros_like(out.scale) if out.zero_point is None else out.zero_point
        assert torch.equal(dequantize(out.codes, out.scale, zero_point), w), name
        assert torch.equal(quantize(w, out.scale, zero_point, cb.bits), out.codes), name


def test_w8a8_trains_converts_and_evaluates_after_fit():
    cb = QATFakeQuant(bits=8, act_bits=8)
    t, model = fit([cb], max_epochs=3)
    assert all(is_fake_quant(model.get_submodule(n)) for n in LAYERS)
    assert cb.converted
    assert_on_grid(cb, model)
    for name in LAYERS:
        act = cb.quantized[name].input
        assert act.scale is not None and act.zero_point is not None
    acc = t.test(model, DigitsDataModule(), verbose=False)[0]["test/acc"]
    assert acc > 0.9
    assert t.validate(model, DigitsDataModule(), verbose=False)[0]["val/acc"] > 0.9
    preds = torch.cat(t.predict(model, DigitsDataModule()))
    assert preds.shape == (270,)


def test_fp8_trains_converts_onto_e4m3_and_resumes(tmp_path):
    cb = QATFakeQuant(bits=8, method="fp8", act_bits=8, convert=False)
    fit([cb, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=1)
    resumed = QATFakeQuant(bits=8, method="fp8", act_bits=8)
    t, model = fit([resumed], max_epochs=3, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.converted and resumed.step == 3 * 20
    for name in LAYERS:
        layer, out = model.get_submodule(name), resumed.quantized[name]
        w = layer.weight
        assert out.weight.format == "fp8" and out.weight.codes.dtype == torch.float8_e4m3fn
        absmax = w.abs().amax((1, 2, 3) if w.dim() == 4 else 1).reshape(out.weight.scale.shape)
        torch.testing.assert_close(out.weight.scale, absmax / 448, rtol=1e-6, atol=0)  # per channel max|w| / 448
        assert torch.equal(out.weight.dequantize(), w)  # converted: exactly on the grid
        assert (out.input.method, out.input.dynamic) == ("fp8", True)
        x = torch.randn(3, 7) * 5
        s = x.abs().amax(-1, keepdim=True) / 448
        assert torch.equal(layer.act_quantizer(x), (x / s).to(torch.float8_e4m3fn).float() * s)
    assert t.test(model, DigitsDataModule(), verbose=False)[0]["test/acc"] > 0.9


@pytest.mark.slow
def test_checkpoint_loads_plain_and_tests_in_a_fresh_process(tmp_path):
    cb = QATFakeQuant(bits=4, lsq=True, act_bits=8, observer=MinMaxObserver())
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t, model = fit([cb, ckpt], max_epochs=2)
    expected = t.test(model, DigitsDataModule(), verbose=False)[0]["test/acc"]
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    ImageClassifier(SmallCNN()).load_state_dict(state["state_dict"], strict=True)
    script = f"""
import lightning.pytorch as pl
from lightning_compress import QATFakeQuant
from lightning_compress.examples.images import DigitsDataModule
from lightning_compress.examples.models import ImageClassifier, SmallCNN
from lightning_compress.nn.observers import MinMaxObserver
cb = QATFakeQuant(bits=4, lsq=True, act_bits=8, observer=MinMaxObserver())
t = pl.Trainer(accelerator="cpu", callbacks=[cb], logger=False, enable_progress_bar=False)
print("ACC", t.test(ImageClassifier(SmallCNN()), DigitsDataModule(), ckpt_path=r"{tmp_path / "last.ckpt"}",
                    verbose=False)[0]["test/acc"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = float(next(ln for ln in proc.stdout.splitlines() if ln.startswith("ACC")).split()[1])
    assert acc == pytest.approx(expected, abs=1e-6)


def test_resume_restores_observer_ranges_and_freeze_state(tmp_path):
    first = QATFakeQuant(bits=8, act_bits=8, freeze_observers_step=5, convert=False)
    fit([first, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=1)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    resumed = QATFakeQuant(bits=8, act_bits=8, freeze_observers_step=5, convert=False)
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            for name, layer in resumed.layers.items():
                obs = layer.act_quantizer.observer
                seen[name] = (obs.min_val.item(), obs.max_val.item(), obs.frozen)

    fit([resumed, Probe()], max_epochs=2, ckpt_path=tmp_path / "last.ckpt")
    for name in LAYERS:
        act = saved["layers"][name]["act"]
        assert seen[name] == (act["min_val"].item(), act["max_val"].item(), True)
        obs = resumed.layers[name].act_quantizer.observer
        assert obs.min_val.item() == act["min_val"].item()  # frozen: the second epoch did not move it
    assert resumed.step == 2 * 20


def test_bf16_mixed_runs_and_converts():
    cb = QATFakeQuant(bits=8, act_bits=8)
    _, model = fit([cb], precision="bf16-mixed")
    assert_on_grid(cb, model)


def test_composes_with_24_pruning_zeros_stay_exact():
    pruning = IterativePruning(method="nm", ignore=["net\\.0"])
    cb = QATFakeQuant(bits=8, act_bits=8)
    _, model = fit([pruning, cb], max_epochs=2)
    assert_on_grid(cb, model)
    for name in LAYERS[1:]:
        w = model.get_parameter(f"{name}.weight")
        assert sparsity_pattern(w) == "2:4"
        assert torch.all(w[~pruning.masks[f"{name}.weight"]] == 0)  # pruned stay exactly zero on the int8 grid


def test_kmeans_fine_tunes_shared_centroids():
    cb = QATFakeQuant(method="kmeans", bits=4)
    initial = {}

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if not initial:
                initial.update({n: layer.weight_quantizer.centroids.detach().clone() for n, layer in cb.layers.items()})

    _, model = fit([cb, Capture()], max_epochs=2)
    for name in LAYERS:
        w = model.get_parameter(f"{name}.weight")
        centroids = cb.quantized[name].weight.codebook
        assert len(torch.unique(w)) <= 16
        assert torch.equal(w, centroids[cb.quantized[name].weight.codes] * cb.quantized[name].weight.mask)
        assert not torch.equal(centroids, initial[name])  # the codebook was trained


def test_start_epoch_keeps_full_precision_until_then():
    cb = QATFakeQuant(bits=2, start_epoch=1, convert=False)
    states = []

    class Probe(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            states.append([cb.layers[n].enabled for n in LAYERS])

    fit([cb, Probe()], max_epochs=2)
    assert states == [[False] * 4, [True] * 4]


class MaskRanks(pl.Callback):
    def __init__(self, qat, out):
        self.qat, self.out = qat, out

    def on_train_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for layer in self.qat.layers.values():
            obs = layer.act_quantizer.observer
            digest.update(f"{obs.min_val.item():.9g},{obs.max_val.item():.9g}".encode())
        (self.out / f"rank{trainer.global_rank}.txt").write_text(digest.hexdigest())


@pytest.mark.slow
def test_ddp_keeps_observer_ranges_identical(tmp_path):
    cb = QATFakeQuant(bits=8, act_bits=8, observer=MinMaxObserver(), convert=False)
    pl.seed_everything(0)
    t = trainer([cb, MaskRanks(cb, tmp_path), CloseProcessGroup()], 1, devices=2, strategy="ddp_spawn")
    t.fit(ImageClassifier(SmallCNN()), DigitsDataModule())
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 9}, r"bits must be in \[2, 8\], got 9"),
        ({"bits": 1}, r"bits must be in \[2, 8\], got 1"),
        ({"act_bits": 12}, r"act_bits must be in \[2, 8\], got 12"),
        ({"group_size": 0}, "group_size must be a positive int"),
        ({"observer": MSEObserver(bits=4), "act_bits": 8}, r"MSEObserver\(bits=4, symmetric=False\) does not match"),
        ({"method": "log"}, "method='log' is not supported"),
        ({"method": "fp8", "bits": 4}, r"method='fp8' \(E4M3\) has 8 bits and no zero-point; got bits=4"),
        ({"method": "fp8", "bits": 8, "act_bits": 4}, "method='fp8' quantizes activations to FP8 .* act_bits=4"),
        ({"scale_dtype": "float32"}, "scale_dtype='float32' is not supported"),
        ({"lsq": True, "scale_dtype": "float16"}, "allowed with lsq=True: None"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATFakeQuant(**kwargs)


def test_targets_that_are_not_regexes_fail_at_construction():
    with pytest.raises(TypeError, match="targets must be a regex string or a list of them, got 5"):
        QATFakeQuant(targets=5)


def test_an_observer_that_is_not_one_fails_at_construction():
    with pytest.raises(TypeError, match="observer='median' is not an Observer"):
        QATFakeQuant(act_bits=8, observer="median")


def test_one_observer_copy_per_layer_from_an_instance_or_a_class():
    prototype = PercentileObserver(percentile=99.0)
    for observer in (prototype, PercentileObserver):
        cb = QATFakeQuant(act_bits=8, observer=observer)
        layers = cb.swap(ImageClassifier(SmallCNN()))
        made = [layer.act_quantizer.observer for layer in layers.values()]
        assert all(type(o) is PercentileObserver for o in made) and len({id(o) for o in made}) == len(made)
        assert prototype not in made


def test_group_size_not_dividing_a_layer_fails_before_any_swap():
    model = ImageClassifier(SmallCNN())
    with pytest.raises(ValueError, match=r"layer 'net.0': group_size=32 does not divide the input dimension 9"):
        fit([QATFakeQuant(bits=4, group_size=32)], model=model)
    assert not any(is_fake_quant(m) for m in model.modules())


def test_converting_with_an_observer_that_saw_nothing_fails_and_changes_nothing():
    cb = QATFakeQuant(bits=8, act_bits=8)
    model = ImageClassifier(SmallCNN())
    cb.layers = cb.swap(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="has seen no data"):
        cb.convert_layers()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_non_float_layer_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match=r"layer '0' has a torch.int32 weight; allowed: float layers"):
        QATFakeQuant().swap(model)
    assert type(model[0]) is nn.Linear


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["qat_int8", "qat_int4", "kmeans_4bit", "deep_compression", "[prune_24,qat_int8]"])
def test_recipes_run_from_the_command_line(recipe, tmp_path):
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "scripts/train.py", f"+compress={recipe}", f"hydra.run.dir={tmp_path}"]
    cmd += ["trainer.max_epochs=3", "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| net.6 | FakeQuantLinear | 64×512 |" in proc.stdout
    assert float(next(ln for ln in proc.stdout.splitlines() if ln.startswith("test/acc:")).split(":")[1]) > 0.5
    if "kmeans" in recipe or recipe == "deep_compression":
        assert "| + Huffman coding |" in (tmp_path / "report.md").read_text()


def test_two_callbacks_on_the_same_layers_fail_before_any_swap():
    model = ImageClassifier(SmallCNN())
    with pytest.raises(ValueError, match="two QATFakeQuant callbacks select the same layers"):
        fit([QATFakeQuant(bits=8), QATFakeQuant(bits=4, targets=["net.0", "net.2"])], model=model)
    assert not any(is_fake_quant(m) for m in model.modules())


def test_two_callbacks_on_disjoint_layers_both_apply():
    cb8, cb4 = QATFakeQuant(bits=8, ignore=["net.0"]), QATFakeQuant(bits=4, targets=["net.0"])
    _, model = fit([cb8, cb4])
    assert set(cb8.layers) == {"net.2", "net.6", "net.8"} and set(cb4.layers) == {"net.0"}
    assert all(is_fake_quant(model.get_submodule(n)) for n in LAYERS)


def test_checkpoint_state_key_is_what_earlier_versions_wrote():
    """Checkpoints from before the scheme -> method rename keep resuming: the callback's state key is unchanged."""
    assert (
        QATFakeQuant(bits=4, method="kmeans").state_key
        == "QATFakeQuant{'bits': 4, 'scheme': 'kmeans', 'targets': None}"
    )
