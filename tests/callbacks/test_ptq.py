"""SmoothQuantCalibrate and GPTQFinalize: Trainer runs, one-shot on HF models, DDP, bad input, atomicity."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import AWQCalibrate, GPTQFinalize, SmoothQuantCalibrate, SparseGPTPrune, WandaPrune
from lightning_compress.calibration.batches import call_model, relative_error, split_batch
from lightning_compress.calibration.progress import Progress
from lightning_compress.functional.quant import dequantize, quant_range
from lightning_compress.nn.fake_quant import is_fake_quant
from tests.ddp import CloseProcessGroup
from tests.tiny_models import tiny_bert, tiny_llama, token_batches


class LNRegressor(pl.LightningModule):
    """Linear -> LayerNorm -> Linear -> ReLU -> Linear, trained by MSE on a fixed random target."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(n=64, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return DataLoader(TensorDataset(x, torch.randn(n, 4, generator=g)), batch_size=batch)


def _trainer(callbacks, **kwargs):
    return pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


class SaveWeights(pl.Callback):
    """After the PTQ callbacks (listed before it), rank 0 saves the model's state_dict."""

    def __init__(self, path):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.path)


def _on_grid(layer, quantized, bits):
    weight = quantized.weight
    codes, zero_point = weight.codes, torch.zeros(()) if weight.zero_point is None else weight.zero_point
    lo, hi = quant_range(bits)
    assert codes.dtype == torch.int8 and codes.min() >= lo and codes.max() <= hi
    torch.testing.assert_close(layer.weight.detach(), dequantize(codes, weight.scale, zero_point),
                               atol=0, rtol=0)  # fmt: skip


def test_gptq_at_fit_end_quantizes_calibrated_layers_and_checkpoint_loads_into_plain_model(tmp_path):
    model = LNRegressor()
    gptq = GPTQFinalize(bits=4, num_batches=4)
    trainer = _trainer([gptq])
    trainer.fit(model, _loader())
    assert set(gptq.quantized) == {"net.0", "net.2", "net.4"}
    for name, state in gptq.quantized.items():
        layer = model.get_submodule(name)
        assert is_fake_quant(layer)
        _on_grid(layer, state, 4)
        with torch.no_grad():  # the frozen fake-quant forward uses exactly the stored weight
            torch.testing.assert_close(layer.fake_quantized_weight(), layer.weight, atol=0, rtol=0)
    trainer.save_checkpoint(tmp_path / "ptq.ckpt")
    plain = LNRegressor()
    plain.load_state_dict(torch.load(tmp_path / "ptq.ckpt", weights_only=True)["state_dict"], strict=True)
    x = torch.randn(5, 16)
    torch.testing.assert_close(plain(x), model(x))


def test_smoothquant_at_fit_end_with_a_given_calibration_loader():
    model = LNRegressor()
    calib = [(torch.randn(8, 16), torch.zeros(8, 4)) for _ in range(2)]
    sq = SmoothQuantCalibrate(act_granularity="tensor", calibration_data=calib)
    _trainer([sq]).fit(model, _loader())
    assert set(sq.quantized) == {"net.0", "net.2", "net.4"}
    assert sq.quantized["net.2"].input.smooth is None  # folded into the LayerNorm
    assert sq.quantized["net.4"].input.smooth is not None  # after ReLU: explicit
    for name, state in sq.quantized.items():
        _on_grid(model.get_submodule(name), state, 8)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["smoothquant+gptq", "sparsegpt", "awq"])
def test_ddp_calibration_gives_the_same_weights_as_one_process(tmp_path, recipe):
    def run(devices, path):
        pl.seed_everything(0)
        model = LNRegressor(lr=0.0)  # training leaves the weights as they are: only calibration differs
        if recipe == "sparsegpt":  # Hessians summed across ranks, as GPTQ's
            ptq = [SparseGPTPrune(pattern="2:4", bits=4, num_batches=None)]
        elif recipe == "awq":  # mean |X|, the α errors and the clipping errors summed across ranks
            ptq = [AWQCalibrate(bits=3, num_batches=None)]
        else:
            ptq = [SmoothQuantCalibrate(targets="net.2", num_batches=None),
                   GPTQFinalize(bits=3, num_batches=None, act_order=True)]  # fmt: skip
        callbacks = [*ptq, SaveWeights(path), CloseProcessGroup()]
        strategy = "ddp_spawn" if devices > 1 else "auto"
        _trainer(callbacks, devices=devices, strategy=strategy, use_distributed_sampler=True).fit(model, _loader())
        return torch.load(path, weights_only=True)

    one = run(1, tmp_path / "one.pt")
    two = run(2, tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for key in one:  # both ranks saw half the data each; the all-reduced statistics match one process's
        torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_gptq_one_shot_on_hf_models(build):
    model = build().eval()
    batches = token_batches(3)
    reference = call_model(model, batches[0])
    gptq = GPTQFinalize(bits=4, group_size=16, act_order=True, static_groups=True, num_batches=None)
    quantized = gptq.apply(model, batches)
    linears = [n for n, m in build().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(quantized) == sorted(linears)  # every Linear but the output embeddings (see select_layers)
    for name, state in quantized.items():
        assert state.weight.scale.shape[1] == model.get_submodule(name).in_features // 16
        _on_grid(model.get_submodule(name), state, 4)
    assert relative_error(reference, call_model(model, batches[0])) < 0.3


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_smoothquant_one_shot_on_hf_models(build):
    model = build().eval()
    batches = token_batches(3)
    reference = call_model(model, batches[0])
    SmoothQuantCalibrate().apply(model, batches)
    assert relative_error(reference, call_model(model, batches[0])) < 0.05


def test_float32_hessians_give_nearly_the_same_weights():
    batches = [torch.randn(16, 16) for _ in range(3)]
    a, b = LNRegressor(), LNRegressor()
    ea = GPTQFinalize(bits=4, hessian_dtype="float64").apply(a, batches)
    eb = GPTQFinalize(bits=4, hessian_dtype="float32").apply(b, batches)
    for name in ea:
        assert (ea[name].weight.codes != eb[name].weight.codes).float().mean() < 0.01


def test_split_batch_strips_labels():
    x = torch.ones(2)
    assert split_batch((x, 1))[0] is x
    assert split_batch({"input_ids": x, "labels": 1})[0] == {"input_ids": x}
    assert split_batch(x)[0] is x


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (GPTQFinalize, {"bits": 9}, "bits"),
        (GPTQFinalize, {"group_size": 0}, "group_size"),
        (GPTQFinalize, {"percdamp": -1}, "percdamp must be a number >= 0, got -1"),
        (GPTQFinalize, {"block_size": 0}, "block_size"),
        (GPTQFinalize, {"num_batches": 0}, "num_batches must be a positive int or None"),
        (GPTQFinalize, {"targets": "("}, "invalid regex"),
        (GPTQFinalize, {"hessian_dtype": "float16"}, "hessian_dtype='float16' is not supported"),
        (SmoothQuantCalibrate, {"alpha": 1.5}, r"alpha must be a number in \[0, 1\] or None"),
        (SmoothQuantCalibrate, {"act_granularity": "channel"}, "act_granularity='channel' is not supported"),
        (SmoothQuantCalibrate, {"mappings": [["a"]]}, "pairs"),
        (SmoothQuantCalibrate, {"act_bits": 1}, "act_bits"),
    ],
)
def test_bad_arguments_fail_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_selection_or_batches_fail_before_the_model_changes():
    model = LNRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'net.0': group_size=32 does not divide its input width 16"):
        GPTQFinalize(group_size=32).apply(model, [torch.randn(4, 16)])
    with pytest.raises(ValueError, match="match no layer"):
        GPTQFinalize(targets="encoder.*").apply(model, [torch.randn(4, 16)])
    with pytest.raises(ValueError, match="batches is empty"):
        SmoothQuantCalibrate().apply(model, [])
    with pytest.raises(ValueError, match="match no producer"):
        SmoothQuantCalibrate(mappings=[["net.1", "net.4"]]).apply(model, [torch.randn(4, 16)])
    with pytest.raises(TypeError, match="got str"):
        GPTQFinalize().apply(model, ["not a tensor"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(is_fake_quant(m) for m in model.modules())


def test_a_failure_midway_leaves_the_model_untouched(monkeypatch):
    import lightning_compress.calibration.gptq as nn_gptq

    calls = []
    real = nn_gptq.gptq_quantize

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(nn_gptq, "gptq_quantize", fail_on_third)
    model = LNRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        GPTQFinalize(bits=4).apply(model, [torch.randn(4, 16)])
    assert len(calls) == 3  # two layers had been quantized in place ...
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # ... and were restored
    assert not any(is_fake_quant(m) for m in model.modules())


def test_applying_twice_is_an_error():
    model = LNRegressor()
    GPTQFinalize(bits=8).apply(model, [torch.randn(4, 16)])
    with pytest.raises(ValueError, match="match no layer"):
        GPTQFinalize(bits=8).apply(model, [torch.randn(4, 16)])


def test_progress_bar_is_quiet_when_not_a_terminal(capsys):
    with Progress(3, "work") as bar:
        for i in range(3):
            bar.step(str(i))
    assert bar.bar is None and capsys.readouterr().err == ""


@pytest.mark.parametrize("callback", [lambda: GPTQFinalize(bits=4), lambda: SmoothQuantCalibrate()])
def test_apply_takes_a_lightning_dataloader_of_x_y_batches(callback):
    """(x, y) batches from the module's own DataLoader: the input is the first item, the labels are dropped."""
    from_loader, from_tensors = LNRegressor(), LNRegressor()
    callback().apply(from_loader, _loader())
    callback().apply(from_tensors, [x for x, _ in _loader()])
    for (name, a), b in zip(from_loader.state_dict().items(), from_tensors.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_apply_takes_one_tensor_as_one_batch():
    """A (B, C, H, W) tensor is one batch, not B unbatched images (those broke the CNN's Flatten -> Linear)."""
    from lightning_compress.examples.models import SmallCNN

    torch.manual_seed(0)
    one, listed = SmallCNN().eval(), SmallCNN().eval()
    listed.load_state_dict(one.state_dict())
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    GPTQFinalize(bits=4).apply(one, x)
    GPTQFinalize(bits=4).apply(listed, [x])
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), listed.state_dict().values(), strict=True))


def test_batches_the_model_cannot_take_fail_first_saying_what_is_expected():
    model = LNRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"LNRegressor.forward cannot take the calibration batches \(Tensor\(4, 3\).*"
                                        r"\(x, y, \.\.\.\) tuples whose first item is the input"):  # fmt: skip
        GPTQFinalize(bits=4).apply(model, [torch.randn(4, 3)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(is_fake_quant(m) for m in model.modules())


@pytest.mark.parametrize(
    "callback",
    [GPTQFinalize(bits=4), SmoothQuantCalibrate(), SparseGPTPrune(pattern="2:4"), WandaPrune(sparsity=0.5),
     AWQCalibrate(bits=4)],
    ids=lambda c: type(c).__name__,
)  # fmt: skip
def test_token_batches_the_llm_cannot_take_are_refused_before_any_weight_changes(callback):
    model = tiny_llama()
    model.config.max_position_embeddings = 12  # the batches hold 16 tokens
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sequences of 16 tokens, beyond LlamaForCausalLM's context of 12"):
        callback.apply(model, token_batches(2))
    model.config.max_position_embeddings = 2048
    padding_only = [{**b, "attention_mask": torch.zeros_like(b["attention_mask"])} for b in token_batches(2)]
    with pytest.raises(ValueError, match="hold no real token"):
        callback.apply(model, padding_only)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
