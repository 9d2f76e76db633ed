"""compressed-tensors checkpoints: what we write, transformers and compressed-tensors read back exactly; what
compressed-tensors writes, we read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_compress import AWQCalibrate, GPTQFinalize, QATFakeQuant, SmoothQuantCalibrate
from lightning_compress.export.compressed import load_compressed, save_compressed
from lightning_compress.export.int4_linear import Int4Linear
from lightning_compress.export.int8_linear import Int8Linear
from lightning_compress.export.plan import export_for_inference
from lightning_compress.nn.fake_quant import is_fake_quant
from tests.tiny_models import tiny_llama, token_batches

pytest.importorskip("compressed_tensors")


def logits(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def from_pretrained(path, dequantize: bool = False):
    """transformers' loader. ``dequantize=True`` dequantizes on load: asymmetric pack-quantized checkpoints need it
    with compressed-tensors 0.19, whose meta-device compression (the default path) leaves zero-points unpacked."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = CompressedTensorsConfig(dequantize=dequantize)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config).eval()


def gptq_llama(**options) -> nn.Module:
    model = tiny_llama().eval()
    GPTQFinalize(**options).apply(model, token_batches(2))
    return model


def unpacked_codes(path, name: str, bits: int) -> torch.Tensor:
    """The codes compressed-tensors' own unpacking reads from our file."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    tensors = load_file(path / "model.safetensors")
    shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
    return unpack_from_int32(tensors[f"{name}.weight_packed"], bits, shape)


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 4, "symmetric": False},  # W4A16 asymmetric per channel (GPTQ's default)
        {"bits": 4, "group_size": 16, "symmetric": True},  # W4A16 symmetric groups
        {"bits": 4, "group_size": 16, "symmetric": False},
        {"bits": 8, "symmetric": True},  # W8A16
    ],
    ids=["w4-asym-channel", "w4-sym-group16", "w4-asym-group16", "w8a16"],
)
def test_gptq_checkpoint_loads_in_transformers_with_our_logits_and_codes(tmp_path, options):
    model = gptq_llama(**options)
    batches = token_batches(2, seed=7)
    save_compressed(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and config["ignore"] == ["lm_head"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (options["bits"], options["symmetric"])
    assert weights["strategy"] == ("group" if "group_size" in options else "channel")
    name = "model.layers.1.mlp.down_proj"
    ours = model.get_submodule(name).quantized().weight
    assert torch.equal(unpacked_codes(tmp_path / "ct", name, options["bits"]), ours.codes)

    for dequantize in (True, False) if options["symmetric"] else (True,):
        loaded = from_pretrained(tmp_path / "ct", dequantize)
        torch.testing.assert_close(logits(loaded, batches), logits(model, batches), rtol=0, atol=1e-5)


def fp8_rtn(model: nn.Module, act_bits: int | None = 8) -> nn.Module:
    """Round to nearest onto FP8 E4M3 (per-channel weights; dynamic per-token FP8 inputs with ``act_bits=8``)."""
    callback = QATFakeQuant(bits=8, method="fp8", act_bits=act_bits)
    callback.layers = callback.swap(model)
    callback.convert_layers()
    return model


@pytest.mark.parametrize("recipe", ["gptq-fp8-weights", "rtn-fp8-dynamic"])
def test_fp8_checkpoint_loads_in_transformers_with_our_logits_and_codes(tmp_path, recipe):
    model = gptq_llama(bits=8, method="fp8") if recipe == "gptq-fp8-weights" else fp8_rtn(tiny_llama().eval())
    save_compressed(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    # compressed-tensors' own format choice: FP8 weights with FP8 inputs are float-quantized, alone naive-quantized
    fmt = "float-quantized" if recipe == "rtn-fp8-dynamic" else "naive-quantized"
    assert config["format"] == fmt and config["ignore"] == ["lm_head"]
    group = config["config_groups"]["group_0"]
    assert (group["weights"]["type"], group["weights"]["num_bits"], group["weights"]["strategy"]) == (
        "float",
        8,
        "channel",
    )
    inputs = group["input_activations"]
    if recipe == "rtn-fp8-dynamic":
        assert (inputs["type"], inputs["strategy"], inputs["dynamic"]) == ("float", "token", True)
    else:
        assert inputs is None
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    ours = model.get_submodule(name).quantized().weight
    stored = tensors[f"{name}.weight"]
    assert stored.dtype == torch.float8_e4m3fn and torch.equal(stored.view(torch.uint8), ours.codes.view(torch.uint8))
    assert torch.equal(tensors[f"{name}.weight_scale"], ours.scale)

    batches = token_batches(2, seed=7)
    loaded = from_pretrained(tmp_path / "ct")  # compressed-tensors' forward: FP8 inputs per token, as ours
    torch.testing.assert_close(logits(loaded, batches), logits(model, batches), rtol=0, atol=1e-5)
    dense = from_pretrained(tmp_path / "ct", dequantize=True)  # a float model (no input quantization left)
    assert torch.equal(dense.get_submodule(name).weight, ours.dequantize())
    with pytest.raises(ValueError, match="FP8"):
        load_compressed(tmp_path / "ct")


def test_load_compressed_rebuilds_our_int4_layers_exactly(tmp_path):
    model = gptq_llama(bits=4, group_size=16, symmetric=False)
    save_compressed(model, tmp_path / "ct")
    loaded = load_compressed(tmp_path / "ct")
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 2 * 7
    for name, layer in layers.items():
        ours, back = model.get_submodule(name).quantized().weight, layer.quantized().weight
        assert torch.equal(back.codes, ours.codes) and torch.equal(back.scale, ours.scale)
        assert torch.equal(back.zero_point, ours.zero_point) and back.group_size == 16
    assert isinstance(loaded.lm_head, nn.Linear) and torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    batches = token_batches(2, seed=7)
    torch.testing.assert_close(logits(loaded, batches), logits(model, batches), rtol=0, atol=1e-5)


def test_exported_layers_save_the_same_checkpoint_as_their_fake_quant_model(tmp_path):
    model = gptq_llama(bits=4, group_size=16, symmetric=True)
    save_compressed(model, tmp_path / "fake")
    export_for_inference(model)
    assert any(isinstance(m, Int4Linear) for m in model.modules())
    save_compressed(model, tmp_path / "exported")
    a, b = load_file(tmp_path / "fake" / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("act_granularity", ["tensor", "token"])
def test_smoothquant_w8a8_checkpoint(tmp_path, act_granularity):
    model = tiny_llama().eval()
    SmoothQuantCalibrate(act_granularity=act_granularity, explicit_scales=False).apply(model, token_batches(2))
    save_compressed(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    inputs = config["config_groups"]["group_0"]["input_activations"]
    assert (inputs["strategy"], inputs["dynamic"]) == (act_granularity, act_granularity == "token")
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    ours = model.get_submodule(name).quantized()
    assert tensors[f"{name}.weight"].dtype == torch.int8 and torch.equal(tensors[f"{name}.weight"], ours.weight.codes)
    assert (f"{name}.input_scale" in tensors) == (act_granularity == "tensor")

    loaded, batches = from_pretrained(tmp_path / "ct"), token_batches(2, seed=7)
    got, want = logits(loaded, batches), logits(model, batches)
    if act_granularity == "tensor":  # the static scale is ours: the same activation codes, the same logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    else:  # compressed-tensors' per-token scale is absmax / 127.5, ours (and vLLM's kernel) absmax / 127
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    back = load_compressed(tmp_path / "ct")
    layer = back.get_submodule(name)
    assert isinstance(layer, Int8Linear) and torch.equal(layer.quantized().weight.codes, ours.weight.codes)
    assert (layer.act_scale is None) == (act_granularity == "token")


def test_qat_w8a8_with_static_asymmetric_inputs_loads_with_our_logits_exactly(tmp_path):
    from lightning_compress.nn.observers import MinMaxObserver

    model = tiny_llama()
    callback = QATFakeQuant(bits=8, act_bits=8, observer=MinMaxObserver())
    callback.layers = callback.swap(model)
    with torch.no_grad():  # the observers see the training batches
        for b in token_batches(2):
            model.train()(**b)
    callback.convert_layers()
    save_compressed(model.eval(), tmp_path / "ct")
    group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    inputs = group["group_0"]["input_activations"]
    assert (inputs["strategy"], inputs["symmetric"], inputs["dynamic"]) == ("tensor", False, False)
    batches = token_batches(2, seed=7)
    assert torch.equal(logits(from_pretrained(tmp_path / "ct"), batches), logits(model, batches))


def test_a_checkpoint_compressed_tensors_wrote_loads_into_our_layers(tmp_path):
    """llm-compressor's save path: a scheme applied by compressed-tensors, its qparams, compress_model, save."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_llama().eval()
    reference = tiny_llama().eval()
    scheme = preset_name_to_scheme("W4A16", ["Linear"])  # symmetric int4, groups of 128 -> use 16 here
    scheme.weights.group_size = 16
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            w = module.weight.data.reshape(module.out_features, -1, 16)
            scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), scheme.weights)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero)
            q = quantize(module.weight.data, scale, zero, scheme.weights)
            reference.get_submodule(name).weight.data.copy_(dequantize(q, scale, zero, scheme.weights))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "ct")
    compressor.update_config(str(tmp_path / "ct"))

    loaded, batches = load_compressed(tmp_path / "ct"), token_batches(2, seed=7)
    assert sum(isinstance(m, Int4Linear) for m in loaded.modules()) == 14
    torch.testing.assert_close(logits(loaded, batches), logits(reference, batches), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input
def test_what_compressed_tensors_cannot_hold_is_refused_before_any_file(tmp_path):
    target = tmp_path / "ct"
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_compressed(nn.Sequential(nn.Linear(4, 4)), target)
    with pytest.raises(ValueError, match="no quantized layers"):
        save_compressed(tiny_llama(), target)
    with pytest.raises(
        ValueError, match=r"layer 'model\.layers\.0\.self_attn\.o_proj' divides its input by an explicit SmoothQuant"
    ):
        model = tiny_llama().eval()
        SmoothQuantCalibrate(explicit_scales=True).apply(model, token_batches(2))
        save_compressed(model, target)
    with pytest.raises(ValueError, match="one per column.*static_groups=True"):
        save_compressed(gptq_llama(bits=4, group_size=16, static_groups=False), target)
    with pytest.raises(ValueError, match="codebook"):
        model = tiny_llama()
        for layer in QATFakeQuant(bits=4, method="kmeans").swap(model).values():
            layer.weight_quantizer.cluster(layer.weight)
        save_compressed(model, target)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path):
    class Broken:
        def save_pretrained(self, path):
            (path / "half.json").write_text("{")
            raise OSError("disk full")

    model = gptq_llama(bits=4)
    target = save_compressed(model, tmp_path / "ct")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, target, tokenizer=Broken())
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]
    assert all(is_fake_quant(m) for n, m in model.named_modules() if n.endswith("q_proj"))


def test_load_compressed_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_compressed(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no compressed-tensors quantization_config"):
        load_compressed(tmp_path / "plain")


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    from lightning_compress.examples.pretrained import load_pretrained
    from lightning_compress.examples.text import token_sequences

    model, tokenizer = load_pretrained("smollm2", task="causal_lm")
    text = ["The jury said the election was conducted fairly, and the city praised the way it was run. " * 16]
    return model.eval(), tokenizer, token_sequences(tokenizer, text, 64, 2, 4)


class FP8Dynamic:
    """Round to nearest onto FP8 weights and per-token FP8 inputs, as a one-shot recipe."""

    def apply(self, model: nn.Module, batches: list) -> None:
        fp8_rtn(model)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        lambda: GPTQFinalize(bits=4, group_size=64),  # W4A16 asymmetric groups (GPTQ's default + clip search)
        lambda: AWQCalibrate(bits=4, group_size=64),  # AWQ W4A16
        lambda: SmoothQuantCalibrate(act_granularity="tensor", explicit_scales=False),  # W8A8, static activations
        lambda: GPTQFinalize(bits=8, method="fp8"),  # FP8 E4M3 weights, per channel
        lambda: FP8Dynamic(),  # FP8 weights and dynamic per-token FP8 inputs (vLLM's FP8_DYNAMIC)
    ],
    ids=["gptq-w4a16-g64", "awq-w4a16-g64", "smoothquant-w8a8", "gptq-fp8", "rtn-fp8-dynamic"],
)
def test_smollm2_checkpoints_load_in_plain_transformers_with_our_logits(tmp_path, smollm2, recipe):
    import copy

    base, tokenizer, batches = smollm2
    model = copy.deepcopy(base)
    callback = recipe()
    callback.apply(model, batches[:1])
    save_compressed(model, tmp_path / "ct", tokenizer)
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
    # GPTQ and AWQ are asymmetric (see from_pretrained); W8A8 loads the default way, quantizing activations
    loaded = from_pretrained(tmp_path / "ct", dequantize=isinstance(callback, (GPTQFinalize, AWQCalibrate))
                             and callback.options.method == "linear")  # fmt: skip
    torch.testing.assert_close(logits(loaded, batches[1:]), logits(model, batches[1:]), rtol=0, atol=1e-3)
