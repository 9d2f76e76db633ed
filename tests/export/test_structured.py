"""Physical structured pruning: the smaller model computes what the masked model computes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.examples.models import SmallCNN
from lightning_compress.export.structured import plan_structured, prune_structured
from lightning_compress.functional.masks import row_mask


def _mask_rows(layer: nn.Module, sparsity: float, bias: bool = True) -> Tensor:
    """Zero the smallest-L1 rows of ``layer`` (and their bias entries when ``bias``); returns the weight mask."""
    mask = row_mask(layer.weight, sparsity)
    with torch.no_grad():
        layer.weight.mul_(mask)
        if bias and layer.bias is not None:
            layer.bias.mul_(mask.reshape(mask.shape[0], -1)[:, 0])
    return mask


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def test_mlp_rows_and_reader_columns_removed():
    model = _mlp()
    for i in (0, 2):
        _mask_rows(model[i], 0.5)
    before, x = _snapshot(model), torch.randn(8, 20)
    pruned = prune_structured(model, x)
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
    assert [(m.in_features, m.out_features) for m in pruned[::2]] == [(20, 16), (16, 8), (8, 4)]
    assert _n_params(pruned) == (20 * 16 + 16) + (16 * 8 + 8) + (8 * 4 + 4)
    assert _n_params(model) == (20 * 32 + 32) + (32 * 16 + 16) + (16 * 4 + 4)
    _assert_unchanged(model, before)
    assert model[0].out_features == 32


def test_masks_dict_applies_masks_and_folds_unmasked_bias():
    """With ``masks`` the pruned rows still output their bias: it goes through ReLU into the next layer's bias."""
    model = _mlp()
    masks = {"0.weight": row_mask(model[0].weight, 0.5), "2.weight": row_mask(model[2].weight, 0.75)}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for key, mask in masks.items():
            reference.get_parameter(key).mul_(mask)
    assert (reference[0].bias[~masks["0.weight"][:, 0]].relu() != 0).any()  # something to fold
    before, x = _snapshot(model), torch.randn(8, 20)
    pruned = prune_structured(model, x, masks)
    torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=0)
    assert [(m.in_features, m.out_features) for m in pruned[::2]] == [(20, 16), (16, 4), (4, 4)]
    _assert_unchanged(model, before)
    plan = plan_structured(model, x, masks)
    assert plan.removed == {"0": (32, 16), "2": (16, 4)} and not plan.skipped


class _FunctionalCNN(nn.Module):
    """LeNet-style forward with functional ops and ``view(x.size(0), -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3)
        self.fc1, self.fc2 = nn.Linear(16 * 2 * 2, 24), nn.Linear(24, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.dropout(F.max_pool2d(torch.relu(self.conv2(x)), 2), 0.5, training=self.training)
        x = x.view(x.size(0), -1)
        return self.fc2(F.gelu(self.fc1(x)) * 0.5)


def test_small_cnn_filters_become_flattened_features():
    torch.manual_seed(0)
    model = SmallCNN()  # conv(1->16) relu conv(16->32) relu maxpool flatten linear(512->64) relu linear(64->10)
    for i, sparsity in ((0, 0.5), (2, 0.75), (6, 0.5)):
        _mask_rows(model[i], sparsity)
    before, x = _snapshot(model), torch.randn(4, 1, 8, 8)
    pruned = prune_structured(model, x)
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
    assert (pruned[0].out_channels, pruned[2].in_channels, pruned[2].out_channels) == (8, 8, 8)
    assert (pruned[6].in_features, pruned[6].out_features, pruned[8].in_features) == (8 * 4 * 4, 32, 32)
    assert pruned[8].out_features == 10
    expected = (8 * 9 + 8) + (8 * 8 * 9 + 8) + (128 * 32 + 32) + (32 * 10 + 10)
    assert _n_params(pruned) == expected and _n_params(model) == 38282
    kept = row_mask(model[2].weight, 0.75)[:, 0, 0, 0].repeat_interleave(16)  # channel c -> features 16c..16c+15
    torch.testing.assert_close(pruned[6].weight, model[6].weight[row_mask(model[6].weight, 0.5)[:, 0]][:, kept])
    _assert_unchanged(model, before)


def test_functional_cnn_with_view_flatten():
    torch.manual_seed(0)
    model = _FunctionalCNN().eval()
    for layer, sparsity in ((model.conv1, 0.5), (model.conv2, 0.5), (model.fc1, 0.25)):
        _mask_rows(layer, sparsity)
    x = torch.randn(3, 3, 14, 14)
    pruned = prune_structured(model, x)
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
    assert (pruned.conv1.out_channels, pruned.conv2.in_channels, pruned.conv2.out_channels) == (4, 4, 8)
    assert (pruned.fc1.in_features, pruned.fc1.out_features, pruned.fc2.in_features) == (8 * 4, 18, 18)
    assert pruned.fc2.out_features == 5


def _bn_net(pad: int) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=pad), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )  # fmt: skip
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(0.1, 1)  # pruned channels become relu(beta - ...) != 0
    return net.eval()


def test_batchnorm_sliced_and_its_shift_folded_into_reader():
    model = _bn_net(pad=0)
    keep0 = _mask_rows(model[0], 0.5)[:, 0, 0, 0]
    _mask_rows(model[3], 0.5)
    x = torch.randn(2, 3, 10, 10)
    pruned = prune_structured(model, x)
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
    assert (pruned[0].out_channels, pruned[1].num_features, pruned[3].in_channels) == (4, 4, 4)
    assert (pruned[3].out_channels, pruned[4].num_features, pruned[8].in_features) == (6, 6, 6)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(pruned[1], attr), getattr(model[1], attr)[keep0])
    keep3 = row_mask(model[3].weight, 0.5)[:, 0, 0, 0]
    assert not torch.allclose(pruned[3].bias, model[3].bias[keep3])  # the constant channels went into the bias


def test_zero_padded_reader_of_shifted_channels_left_unpruned(caplog):
    model = _bn_net(pad=1)
    mask = _mask_rows(model[0], 0.5)
    x = torch.randn(2, 3, 10, 10)
    with caplog.at_level(logging.WARNING, logger="lightning_compress.export.structured"):
        pruned = prune_structured(model, x)
    assert pruned[0].out_channels == 8 and pruned[1].num_features == 8 and pruned[3].in_channels == 8
    assert any(
        r.getMessage().startswith("prune_structured: 0 keeps") and "zero-pads" in r.getMessage() for r in caplog.records
    )
    torch.testing.assert_close(pruned(x), model(x), atol=0, rtol=0)
    channels = mask[:, 0, 0, 0]  # masking the BatchNorm's affine too makes the pruned channels zero: then it goes
    masks = {"0.weight": mask, "1.weight": channels, "1.bias": channels}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference[1].weight.mul_(channels), reference[1].bias.mul_(channels)
    pruned = prune_structured(model, x, masks)
    assert pruned[0].out_channels == 4 and pruned[3].in_channels == 4
    torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=0)


class _Unfollowable(nn.Module):
    """``inp`` feeds ``mid`` only; ``mid`` and ``skip`` meet in a residual add; ``twice`` is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.skip = nn.Linear(10, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.twice, self.norm, self.out = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(torch.relu(self.inp(x)))
        h = self.norm(h + self.skip(h))
        return self.out(self.twice(self.twice(h)))


def test_unfollowable_outputs_left_unpruned_with_warning(caplog):
    torch.manual_seed(0)
    model = _Unfollowable()
    for layer in (model.inp, model.mid, model.skip, model.twice, model.out):
        _mask_rows(layer, 0.5)
    x = torch.randn(4, 10)
    with caplog.at_level(logging.WARNING, logger="lightning_compress.export.structured"):
        pruned = prune_structured(model, x)
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
    assert (pruned.inp.out_features, pruned.mid.in_features) == (8, 8)
    assert [m.out_features for m in (pruned.mid, pruned.skip, pruned.twice, pruned.out)] == [16, 16, 16, 6]
    warned = {r.getMessage().split()[1]: r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert set(warned) == {"mid", "skip", "twice", "out"}
    assert "add" in warned["mid"] and "add" in warned["skip"]
    assert "called 2 times" in warned["twice"] and "model output" in warned["out"]


class _SelfAttention(nn.Module):
    """BERT-style: ``query`` / ``key`` / ``value`` and ``num_attention_heads`` / ``attention_head_size``."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[0], x.shape[1], self.num_attention_heads, self.attention_head_size)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.query, self.key, self.value))
        att = (q @ k.transpose(-1, -2) / self.attention_head_size**0.5).softmax(-1)
        return (att @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


class _Block(nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = _SelfAttention(hidden, heads)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 64), nn.GELU(), nn.Linear(64, hidden))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention.output.dense(self.attention.self(x))
        return x + self.ffn(x)


def _head_masks(hidden: int, heads: int, gone: list[int], shape: tuple[int, ...]) -> Tensor:
    keep = torch.ones(heads, dtype=torch.bool)
    keep[gone] = False
    rows = keep.repeat_interleave(hidden // heads)
    return rows.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def test_self_attention_heads_removed_and_value_bias_folded():
    torch.manual_seed(0)
    model = _Block().eval()
    names = [f"attention.self.{p}.weight" for p in ("query", "key", "value")]
    masks = {n: _head_masks(32, 4, [1, 3], (32, 32)) for n in names}  # weights only: v's bias stays, gets folded
    masks["ffn.0.weight"] = row_mask(model.ffn[0].weight, 0.5)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for key, mask in masks.items():
            reference.get_parameter(key).mul_(mask)
    x = torch.randn(2, 5, 32)
    plan = plan_structured(model, x, masks)
    assert plan.removed == {"attention.self": (4, 2), "ffn.0": (64, 32)} and not plan.skipped
    pruned = prune_structured(model, x, masks)
    torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=0)
    att = pruned.attention.self
    assert att.num_attention_heads == 2 and att.query.out_features == att.value.out_features == 16
    assert pruned.attention.output.dense.in_features == 16 and pruned.attention.output.dense.out_features == 32
    assert (pruned.ffn[0].out_features, pruned.ffn[2].in_features) == (32, 32)
    assert model.attention.self.num_attention_heads == 4 and model.attention.self.query.out_features == 32


def test_hugging_face_bert_heads_removed():
    import transformers  # a dev dependency: missing it is a failure, not a skip

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    gone = {0: [1], 1: [0, 2]}
    masks = {
        f"encoder.layer.{i}.attention.self.{p}.{kind}": _head_masks(32, 4, heads, shape)
        for i, heads in gone.items()
        for p in ("query", "key", "value")
        for kind, shape in (("weight", (32, 32)), ("bias", (32,)))
    }
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for key, mask in masks.items():
            reference.get_parameter(key).mul_(mask)
    ids = torch.randint(0, 50, (2, 7))
    pruned = prune_structured(model, (ids,), masks)
    torch.testing.assert_close(pruned(ids).last_hidden_state, reference(ids).last_hidden_state, atol=1e-5, rtol=0)
    for i, heads in gone.items():
        att = pruned.encoder.layer[i].attention
        assert att.self.num_attention_heads == 4 - len(heads) and att.self.query.out_features == 8 * (4 - len(heads))
        assert att.output.dense.in_features == 8 * (4 - len(heads))
    if callable(getattr(model, "prune_heads", None)):  # transformers < 5 records them in the config
        assert {k: sorted(v) for k, v in pruned.config.pruned_heads.items()} == gone
        assert not model.config.pruned_heads
    assert model.encoder.layer[1].attention.self.num_attention_heads == 4


def test_bad_masks_raise_before_anything_changes():
    model = _mlp()
    before, x = _snapshot(model), torch.randn(2, 20)
    good = row_mask(model[0].weight, 0.5)
    with pytest.raises(ValueError, match="no parameter"):
        prune_structured(model, x, {"0.weight": good, "9.weight": good})
    with pytest.raises(ValueError, match=r"shape \(16, 32\)"):
        prune_structured(model, x, {"0.weight": good, "2.weight": good})
    with pytest.raises(ValueError, match="bool"):
        prune_structured(model, x, {"0.weight": good.float()})
    _assert_unchanged(model, before)


def test_unpruned_model_comes_back_equal():
    model = _mlp()
    x = torch.randn(4, 20)
    pruned = prune_structured(model, x)
    assert pruned is not model and pruned[0].weight is not model[0].weight
    assert torch.equal(pruned(x), model(x)) and _n_params(pruned) == _n_params(model)
