import pytest
from torch import nn

from lightning_compress.examples.models import SmallCNN
from lightning_compress.nn.select import select_layers


def test_default_selects_every_linear_and_conv():
    assert list(select_layers(SmallCNN())) == ["0", "2", "6", "8"]


def test_targets_and_ignore_are_fullmatch_regexes():
    model = nn.ModuleDict({"encoder": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "head": nn.Linear(4, 2)})
    assert list(select_layers(model, targets="encoder\\..*")) == ["encoder.0", "encoder.1"]
    assert list(select_layers(model, ignore=["head"])) == ["encoder.0", "encoder.1"]
    assert list(select_layers(model, targets=["head", "encoder.1"])) == ["encoder.1", "head"]
    with pytest.raises(ValueError):  # fullmatch: "encoder" names the container, not a Linear
        select_layers(model, targets="encoder")


def test_selection_matching_nothing_raises_naming_the_candidates():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"targets='fc.\*' with ignore=None match no layer.*\['0', '2'\]"):
        select_layers(model, targets="fc.*")
    with pytest.raises(ValueError, match="match no layer"):
        select_layers(model, ignore=".*")


def test_invalid_regex_names_the_parameter():
    with pytest.raises(ValueError, match="ignore holds an invalid regex"):
        select_layers(nn.Linear(2, 2), ignore="(")


def test_an_ignore_pattern_that_matches_nothing_is_warned_about(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with caplog.at_level("WARNING", logger="lightning_compress.nn.select"):
        assert list(select_layers(model, ignore=["net\\.0", "2"])) == ["0"]
    assert "ignore pattern 'net\\\\.0' matches none of the model's Linear / Conv layers: ['0', '2']" in caplog.text
    assert "'2'" not in caplog.text.split("layers:")[0]  # the pattern that matched is not reported


def test_a_language_models_output_embeddings_are_left_out_unless_targeted():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    assert "lm_head" not in select_layers(model) and "model.layers.1.mlp.down_proj" in select_layers(model)
    assert list(select_layers(model, targets="lm_head")) == ["lm_head"]
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    tied = LlamaForCausalLM(cfg)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and "lm_head" not in select_layers(tied)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))  # no output embeddings: every layer, as before
    assert list(select_layers(plain)) == ["0", "1"]
