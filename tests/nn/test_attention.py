"""Attention / MLP layouts of BERT, Llama and nn.MultiheadAttention, and head pruning read from them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress import IterativePruning
from lightning_compress.export.structured import plan_structured
from lightning_compress.nn.attention import (
    AttentionLayout,
    MLPLayout,
    attention_kind,
    attention_layout,
    attention_layouts,
    mlp_layouts,
)

transformers = pytest.importorskip("transformers")


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return transformers.BertModel(cfg)


def tiny_llama(kv_heads: int) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
    )
    return transformers.LlamaForCausalLM(cfg)


def test_bert_layouts():
    model = tiny_bert()
    found = attention_layouts(model)
    assert list(found) == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    p = "encoder.layer.1.attention"
    assert found[f"{p}.self"] == AttentionLayout(
        f"{p}.self", "bert", f"{p}.self.query", f"{p}.self.key", f"{p}.self.value", f"{p}.output.dense", 4, 4, 8
    )
    assert not found[f"{p}.self"].grouped and found[f"{p}.self"].in_proj is None
    assert found[f"{p}.self"].mismatch(model) is None
    mlps = mlp_layouts(model)
    assert mlps == {
        f"encoder.layer.{i}": MLPLayout(
            f"encoder.layer.{i}",
            "bert",
            (f"encoder.layer.{i}.intermediate.dense",),
            f"encoder.layer.{i}.output.dense",
            64,
        )
        for i in range(2)
    }


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_layouts(kv_heads):
    model = tiny_llama(kv_heads)
    found = attention_layouts(model)
    assert list(found) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    p = "model.layers.0.self_attn"
    assert found[p] == AttentionLayout(
        p, "llama", f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj", f"{p}.o_proj", 4, kv_heads, 8
    )
    assert found[p].grouped is (kv_heads != 4) and found[p].mismatch(model) is None
    m = "model.layers.1.mlp"
    assert list(mlp_layouts(model)) == ["model.layers.0.mlp", m]
    assert mlp_layouts(model)[m] == MLPLayout(m, "llama", (f"{m}.gate_proj", f"{m}.up_proj"), f"{m}.down_proj", 64)


def test_multihead_attention_layout():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32)
    found = attention_layouts(layer)
    assert found == {"self_attn": AttentionLayout("self_attn", "mha", None, None, None, "self_attn.out_proj", 4, 4, 4)}
    assert found["self_attn"].in_proj == "self_attn.in_proj_weight" and found["self_attn"].projections == ()
    assert mlp_layouts(layer) == {}  # linear1 / linear2 are not a named MLP layout
    assert attention_kind(nn.MultiheadAttention(16, 4, kdim=8, vdim=8)) is None  # separate q/k/v weights


def test_model_without_attention_has_no_layouts():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    assert attention_layouts(model) == {} and mlp_layouts(model) == {}
    assert attention_layout(model, "0") is None


class OldLlamaAttention(nn.Module):
    """The attributes older transformers' LlamaAttention kept on the module, and no config."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)


def test_llama_head_counts_from_module_attributes_and_shape_mismatch():
    model = nn.ModuleDict({"attn": OldLlamaAttention()})
    layout = attention_layout(model, "attn")
    assert (layout.num_heads, layout.num_kv_heads, layout.head_size, layout.grouped) == (4, 2, 8, True)
    model["attn"].num_key_value_heads = 3
    assert (
        attention_layout(model, "attn").mismatch(model) == "attn.k_proj has out_features=16, expected 24 (3 heads of 8)"
    )
    del model["attn"].head_dim  # nothing says how wide a head is: not a layout this module can read
    assert attention_kind(model["attn"]) is None and attention_layouts(model) == {}


def _prune_heads(model: nn.Module, **kwargs) -> IterativePruning:
    cb = IterativePruning(method="heads", sparsity=0.5, **kwargs)
    cb._units = cb.units(model)
    cb._params = {p.name: p.param for u in cb._units for p in u.parts}
    cb.prune_to(None, cb.target)
    return cb


@pytest.mark.parametrize("make", [tiny_bert, lambda: tiny_llama(4)], ids=["bert", "llama"])
def test_heads_pruning_zeroes_qkv_rows_and_output_columns_together(make):
    model = make()
    cb = _prune_heads(model)
    layouts = attention_layouts(model)
    assert [u.name for u in cb._units] == list(layouts)
    for layout in layouts.values():
        q, k, v = (model.get_submodule(p) for p in layout.projections)
        dead = q.weight.abs().sum(dim=1) == 0
        assert dead.reshape(4, 8).all(dim=1).sum() == 2 and int(dead.sum()) == 16  # 2 of 4 whole heads of 8
        for lin in (k, v):
            assert torch.equal(lin.weight.abs().sum(dim=1) == 0, dead)
            assert lin.bias is None or torch.all(lin.bias[dead] == 0)
        output = model.get_submodule(layout.output)
        assert torch.equal(output.weight.abs().sum(dim=0) == 0, dead)


def test_heads_pruning_refuses_grouped_query_attention_before_touching_weights():
    model = tiny_llama(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn' has 2 key/value heads for 4 query heads"):
        IterativePruning(method="heads").units(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="add 'model.layers.1.self_attn' to ignore"):
        IterativePruning(method="heads", ignore="model.layers.0.*").units(model)


def test_structured_export_keeps_llama_heads_with_a_reason():
    model = tiny_llama(4)
    cb = _prune_heads(model, targets="model.layers.0.self_attn")
    masks = {k: m.bool() for k, m in cb.masks.items()}
    plan = plan_structured(model, torch.zeros(1, 4, dtype=torch.long), masks)
    assert (
        list(plan.skipped) == ["model.layers.0.self_attn"] and "Llama-style" in plan.skipped["model.layers.0.self_attn"]
    )
    assert not plan.heads and not plan.removed
