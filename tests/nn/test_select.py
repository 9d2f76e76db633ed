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
