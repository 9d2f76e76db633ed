"""Calibration plumbing: batch forms, transformer blocks, input capture, dataflow between layers."""

import pytest
import torch
from torch import nn

from lightning_compress.calibration.batches import (
    call_args,
    call_model,
    head,
    real_tokens,
    relative_error,
    token_count,
    token_mask,
)
from lightning_compress.calibration.capture import capture_inputs, find_blocks, replace_hidden
from lightning_compress.calibration.dataflow import dataflow
from tests.tiny_models import tiny_bert, tiny_llama, token_batches


def test_call_args_accepts_tensor_tuple_and_dict():
    x = torch.ones(2)
    assert call_args(x) == ((x,), {})
    assert call_args((x, 3)) == ((x, 3), {})
    assert call_args([x]) == ((x,), {})
    args, kwargs = call_args({"input_ids": x})
    assert args == () and kwargs == {"input_ids": x}
    with pytest.raises(TypeError, match="got int"):
        call_args(3)


def test_call_model_passes_tuples_positionally_and_dicts_as_keywords():
    class TwoInputs(nn.Module):
        def forward(self, a, b=0):
            return a * 10 + b

    m = TwoInputs()
    assert call_model(m, (torch.tensor(1.0), torch.tensor(2.0))) == 12
    assert call_model(m, {"a": torch.tensor(1.0), "b": torch.tensor(3.0)}) == 13
    assert call_model(m, torch.tensor(2.0)) == 20


def test_find_blocks_picks_the_transformer_stack():
    bert, llama = tiny_bert(), tiny_llama()
    names = [n for n, m in bert.named_modules() if isinstance(m, nn.Linear)]
    assert find_blocks(bert, names)[0] == "encoder.layer"
    names = [n for n, m in llama.named_modules() if isinstance(m, nn.Linear)]
    assert find_blocks(llama, names)[0] == "model.layers"
    assert find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ["0", "1"]) is None


def test_capture_inputs_stops_at_the_block_and_replays_exactly():
    model = tiny_llama().eval()
    batches = token_batches(3)
    block = model.model.layers[1]
    called = []
    model.lm_head.register_forward_hook(lambda *a: called.append(1))
    inputs = capture_inputs(model, block, batches)
    assert len(inputs) == 3 and not called  # the forward stopped before the head
    captured = []
    block.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        call_model(model, batches[0])
        replay = block(*inputs[0][0], **inputs[0][1])
    replay = replay[0] if isinstance(replay, tuple) else replay
    assert torch.equal(replay, captured[0])


def test_capture_inputs_errors_when_the_module_is_never_called():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="not called"):
        capture_inputs(model, nn.Linear(2, 2), [torch.ones(1, 2)])


def test_replace_hidden_positional_and_keyword():
    h, new = torch.zeros(1), torch.ones(1)
    assert replace_hidden(((h, 5), {"m": 1}), new) == ((new, 5), {"m": 1})
    assert replace_hidden(((), {"hidden_states": h}), new)[1]["hidden_states"] is new
    with pytest.raises(ValueError, match="hidden states"):
        replace_hidden(((), {}), new)


def test_dataflow_groups_shared_inputs_and_finds_their_norm():
    model = tiny_llama().eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    norms = {n: m for n, m in model.named_modules() if "norm" in n}
    flow = dataflow(lambda: call_model(model, token_batches(1)[0]), layers, norms)
    p = "model.layers.0."
    qkv = [f"{p}self_attn.q_proj", f"{p}self_attn.k_proj", f"{p}self_attn.v_proj"]
    assert qkv in flow.groups
    assert [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"] in flow.groups
    assert flow.producers[flow.groups.index(qkv)] == f"{p}input_layernorm"
    assert flow.producers[flow.groups.index([f"{p}mlp.gate_proj", f"{p}mlp.up_proj"])] == f"{p}post_attention_layernorm"
    assert flow.groups.index([f"{p}self_attn.o_proj"]) not in flow.producers  # attention output: no module made it


def test_dataflow_ignores_a_producer_whose_output_is_changed_in_place():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.norm(x)
            y.add_(1.0)  # same storage, different values: folding into the norm would be wrong
            return self.fc(y)

    m = InPlace()
    flow = dataflow(lambda: m(torch.randn(3, 4)), {"fc": m.fc}, {"norm": m.norm})
    assert flow.groups == [["fc"]] and flow.producers == {}


def test_dataflow_lists_uncalled_layers_last():
    m = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    flow = dataflow(lambda: m["a"](torch.ones(1, 2)), dict(m.items()))
    assert flow.groups == [["a"], ["b"]]


def test_relative_error_over_nested_outputs():
    a = {"x": torch.ones(4), "y": (torch.ones(2), torch.tensor([1, 2]))}
    b = {"x": torch.ones(4), "y": (torch.ones(2) * 1.5, torch.tensor([1, 2]))}
    assert relative_error(a, b) == pytest.approx(0.5)


def test_real_tokens_drop_padding_only_where_shapes_line_up():
    mask = token_mask({"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])})
    x = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    assert torch.equal(real_tokens(x, mask), torch.stack([x[0, 0], x[0, 1], x[1, 0]]))
    pooled = torch.ones(2, 4)
    assert real_tokens(pooled, mask) is pooled
    assert token_mask(torch.ones(2, 3)) is None


def test_head_cuts_every_batch_form():
    x, mask = torch.ones(6, 3), torch.ones(6, 3, dtype=torch.long)
    assert head(x, 2).shape == (2, 3)
    cut = head({"input_ids": x, "attention_mask": mask, "flag": True}, 2)
    assert cut["input_ids"].shape == (2, 3) and cut["attention_mask"].shape == (2, 3) and cut["flag"] is True
    a, b = head((x, torch.ones(3)), 2)
    assert a.shape == (2, 3) and b.shape == (3,)  # a tensor of another leading size is not a per-sample input


def test_token_count_counts_the_rows_a_linear_sees():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert token_count({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": mask}) == 3
    assert token_count({"input_ids": torch.zeros(2, 3, dtype=torch.long)}) == 6  # every id is a token
    assert token_count(torch.randn(5, 16)) == 5
    assert token_count((torch.randn(2, 7, 16), torch.ones(2))) == 14
    assert token_count({"flag": True}) == 0
