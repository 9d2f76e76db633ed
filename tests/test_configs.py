"""Every config file composes and instantiates; unknown recipes fail with Hydra's listing."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import open_dict, read_write

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "data", "trainer", "callbacks"]


def _compose(overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_instantiates(group, option, tmp_path):
    cfg = _compose([f"{group}={option}"], tmp_path)
    obj = instantiate(cfg[group])
    assert obj is not None


@pytest.mark.parametrize("recipe", _options("compress"))
def test_every_recipe_composes_and_instantiates(recipe, tmp_path):
    cfg = _compose([f"+compress={recipe}"], tmp_path)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    assert len(callbacks) > len(_compose([], tmp_path).callbacks)


def test_unknown_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(MissingConfigException, match="compress/nonexistent"):
        _compose(["+compress=nonexistent"], tmp_path)


def test_export_config_composes_with_a_recipe_and_names_real_arguments():
    import inspect

    from lightning_compress.export.plan import export_for_inference

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="export", overrides=["+compress=[prune_24,qat_int8]", "ckpt_path=last.ckpt"])
    assert set(cfg.callbacks) >= {"pruning", "qat"} and cfg.ckpt_path == "last.ckpt"
    # every key is export_for_inference's, but format (the serving format, which scripts/export.py takes itself)
    assert set(cfg.export) - {"format"} <= set(inspect.signature(export_for_inference).parameters)
    assert cfg.export.format is None


EXAMPLE_CONF = CONF.parent / "examples" / "my_conf"


@pytest.mark.parametrize("path", [str(EXAMPLE_CONF), "examples/my_conf"], ids=["absolute", "relative"])
def test_a_user_config_folder_replaces_the_default_model_and_data_whole(path, tmp_path, monkeypatch):
    """`model=rescnn` from the user's own folder (on the search path, as `--config-dir` puts it) keeps no key of
    conf/model/cnn.yaml (no `net:`); a relative ``file://`` path is relative to the working directory."""
    import yaml

    monkeypatch.chdir(CONF.parent)
    cfg = _compose([f"hydra.searchpath=[file://{path}]", "model=rescnn", "data=my_digits", "+compress=prune_24"],
                   tmp_path)  # fmt: skip
    assert set(cfg.model) == set(yaml.safe_load((EXAMPLE_CONF / "model" / "rescnn.yaml").read_text()))
    assert "net" not in cfg.model
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    assert type(model).__name__ == "ResCNN" and type(data).__name__ == "MyDigitsDataModule"
    assert "ignore" not in cfg.callbacks.pruning  # recipes name no layers of the example model


def test_dropping_the_default_model_lets_the_command_line_give_one(tmp_path):
    cfg = _compose(["~model", "+model._target_=lightning_compress.examples.custom.ResCNN", "+model.width=8"],
                   tmp_path)  # fmt: skip
    assert dict(cfg.model) == {"_target_": "lightning_compress.examples.custom.ResCNN", "width": 8}
    assert instantiate(cfg.model).head.in_features == 32


def test_ptq_lm_option_selects_a_causal_lm_and_its_windows():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose(config_name="ptq")
        cfg = compose(config_name="ptq", overrides=["lm=smollm2", "+compress=gptq_int4", "calibration.seq_len=128"])
    assert (base.pretrained, base.task) == ("all-MiniLM-L6-v2", "base")
    assert (cfg.pretrained, cfg.task, cfg.calibration.seq_len, cfg.calibration.sequences) == (
        "smollm2",
        "causal_lm",
        128,
        128,
    )
    assert "gptq" in cfg.callbacks
