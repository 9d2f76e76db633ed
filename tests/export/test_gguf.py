"""GGUF files: transformers' GGUF loader and gguf's own reader get our codes back exactly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress import GPTQFinalize
from lightning_compress.export.gguf import block_bytes, gguf_type, save_gguf
from lightning_compress.functional.quant import dequantize
from lightning_compress.nn.quantized import QuantizedWeight, round_to_nearest
from tests.tiny_models import tiny_llama, token_batches

gguf = pytest.importorskip("gguf")


def expected_weight(weight: QuantizedWeight, qtype: str) -> torch.Tensor:
    """``S · (q − Z)`` with the block scale (and Q4_1 offset) rounded to fp16 as GGUF stores them."""
    s = weight.scale.half().float()
    if qtype != "Q4_1":
        return dequantize(weight.codes, s, torch.zeros(()))
    m = (-weight.scale * (weight.zero_point + 8)).half().float()
    return dequantize(weight.codes + 8, s, torch.zeros(())) + m.repeat_interleave(
        weight.codes.shape[1] // m.shape[1], dim=1
    )


@pytest.mark.parametrize(
    ("bits", "symmetric", "group_size", "qtype"),
    [(4, True, 32, "Q4_0"), (3, True, None, "Q4_0"), (4, False, 64, "Q4_1"), (8, True, None, "Q8_0")],
)
def test_block_bytes_decode_with_gguf_to_our_codes(bits, symmetric, group_size, qtype):
    torch.manual_seed(0)
    weight = round_to_nearest(torch.randn(8, 128), bits, symmetric, group_size)
    assert gguf_type(weight, 128) == qtype
    data = block_bytes(weight, qtype)
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    assert back.shape == (8, 128)
    assert np.array_equal(back, expected_weight(weight, qtype).numpy())


def test_groups_that_are_not_whole_blocks_have_no_exact_type():
    assert gguf_type(round_to_nearest(torch.randn(4, 64), 4, True, 16), 64) is None
    assert gguf_type(round_to_nearest(torch.randn(4, 48), 4, True, None), 48) is None
    assert gguf_type(round_to_nearest(torch.randn(4, 64), 8, False, None), 64) is None


def quantized_llama(**options) -> nn.Module:
    model = tiny_llama().eval()
    GPTQFinalize(**options).apply(model, token_batches(2))
    return model


@pytest.mark.parametrize(
    ("options", "qtype"),
    [
        ({"bits": 4, "group_size": 32, "symmetric": True}, "Q4_0"),
        ({"bits": 3, "symmetric": True}, "Q4_0"),  # per channel: each row one or two whole blocks
        ({"bits": 8, "symmetric": True}, "Q8_0"),
    ],
)
def test_transformers_reads_our_file_back_to_our_weights_exactly(tmp_path, caplog, options, qtype):
    from transformers import AutoModelForCausalLM

    model = quantized_llama(**options, scale_dtype="float16")  # fp16 scales: GGUF holds our grid exactly
    with caplog.at_level(logging.WARNING, logger="lightning_compress.export.gguf"):
        path = save_gguf(model, tmp_path / "model.gguf")
    assert "GGUF:" not in caplog.text  # nothing rounded
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    quantized = [n for n, m in model.named_modules() if hasattr(m, "weight_quantizer")]
    assert len(quantized) == 14
    for name in quantized:
        ours = model.get_submodule(name)
        assert torch.equal(loaded.get_submodule(name).weight, ours.weight), name
        assert torch.equal(ours.weight, expected_weight(ours.quantized().weight, qtype)), name
    for key, t in model.state_dict().items():  # norms, embeddings, the tied head: F32 as they are
        assert torch.equal(loaded.state_dict()[key], t), key
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["token_embd.weight"] == "F32"
    assert ("output.weight" in types) == (not model.config.tie_word_embeddings)  # a tied head is token_embd
    batches = token_batches(2, seed=7)
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(loaded(**b).logits, model(**b).logits, rtol=0, atol=1e-5)


def test_float32_scales_are_rounded_to_fp16_with_a_warning_and_asymmetric_codes_are_q4_1(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    model = quantized_llama(bits=4, group_size=32, symmetric=False)
    with caplog.at_level(logging.WARNING, logger="lightning_compress.export.gguf"):
        path = save_gguf(model, tmp_path / "model.gguf")
    assert "fp16 block scales change 14 layers' scales" in caplog.text
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.0.attn_")}
    assert types == {"Q4_1", "F32"}  # the projections, and attn_norm
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj"
    want = expected_weight(model.get_submodule(name).quantized().weight, "Q4_1")
    assert torch.equal(loaded.get_submodule(name).weight, want)  # our codes, fp16 d and m


def test_layers_off_the_block_grid_are_rounded_with_a_warning(tmp_path, caplog):
    model = quantized_llama(bits=4, group_size=16, symmetric=True)
    with caplog.at_level(logging.WARNING, logger="lightning_compress.export.gguf"):
        save_gguf(model, tmp_path / "model.gguf")
    assert "fit no block type exactly" in caplog.text and "model.layers.0.self_attn.q_proj" in caplog.text


def test_bad_input_writes_no_file(tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(TypeError, match="causal LM"):
        save_gguf(nn.Linear(4, 4), tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="model_type='bert'"):
        save_gguf(
            BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)), tmp_path / "a.gguf"
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_gptq_group32_as_q4_0_reads_back_exactly_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_compress.examples.pretrained import load_pretrained
    from lightning_compress.examples.text import token_sequences

    model, tokenizer = load_pretrained("smollm2", task="causal_lm")
    text = ["The jury said the election was conducted fairly, and the city praised the way it was run. " * 8]
    batches = token_sequences(tokenizer, text, 64, 2, 2)
    GPTQFinalize(bits=4, group_size=32, symmetric=True, scale_dtype="float16").apply(model.eval(), batches)
    save_gguf(model, tmp_path / "smollm2.gguf", tokenizer, tokenizer_pre="smollm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smollm2.gguf", dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if hasattr(module, "weight_quantizer"):
            assert torch.equal(loaded.get_submodule(name).weight, module.weight), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, model(**batches[0]).logits, rtol=0, atol=1e-4)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="smollm2.gguf")
    sentence = "Hello, world! The Fulton County Grand Jury said Friday."
    assert back(sentence)["input_ids"] == tokenizer(sentence)["input_ids"]


def test_serving_formats_by_name_and_the_transformers_model_inside_a_module(tmp_path):
    from lightning_compress.export.serving import save_for_serving, transformers_model

    model = quantized_llama(bits=4, group_size=32, symmetric=True, scale_dtype="float16")

    class Wrapper(nn.Module):  # a LightningModule-style holder of the transformers model
        def __init__(self, inner: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.model, self.head = inner, head

    assert transformers_model(model) is model
    assert transformers_model(Wrapper(model, nn.Linear(4, 4))) is model
    stray = quantized_llama(bits=4).model.layers[0].mlp.up_proj  # a fake-quant layer outside the LM
    with pytest.raises(ValueError, match=r"quantized layers \['head'\] lie outside the transformers model 'model'"):
        transformers_model(Wrapper(model, stray))
    with pytest.raises(TypeError, match="holds no transformers model"):
        transformers_model(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"format='onnx' is not a serving format"):
        save_for_serving(model, "onnx", tmp_path / "x")
    path = save_for_serving(model, "gguf", tmp_path / "gguf")
    assert path == tmp_path / "gguf" / "model.gguf" and path.is_file()
    assert save_for_serving(model, "compressed-tensors", tmp_path / "ct") == tmp_path / "ct"
    assert (tmp_path / "ct" / "config.json").is_file()
