import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_compress.functional.size import WEIGHT_FORMATS
from lightning_compress.size import STORED_AS, checkpoint_params, main, model_params, parse_count

REPO = Path(__file__).resolve().parents[1]


class Opaque:
    """A pickled object that ``torch.load(weights_only=True)`` refuses (module level, so it unpickles)."""


def run_cli(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell (header and separator rows included, harmlessly)."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def fits_lines(text: str) -> dict[str, str]:
    """``- name (size): where`` lines keyed by name."""
    lines = [line[2:] for line in text.splitlines() if line.startswith("- ")]
    return {line.split(" (")[0]: line.split("): ")[1] for line in lines}


def cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_7b_weights_table(capsys):
    rows = table_rows(run_cli(capsys, "--params", "7e9"))
    gb = {name: rows[name][1] for name in WEIGHT_FORMATS}
    assert gb["fp32"] == "28.00" and gb["fp16 / bf16"] == "14.00" and gb["int8"] == "7.00"
    assert gb["int4"] == "3.50" and gb["int2"] == "1.75" and gb["int3"] == "2.62"
    assert rows["int4 g128"][:3] == ["4.25", "3.72", "7.53x"]  # 4 + 32 / 128 bits
    assert rows["2:4 fp16"][:3] == ["9", "7.88", "3.56x"]  # (16 + 2) / 2 bits
    assert rows["2:4 int8"][:3] == ["5", "4.38", "6.40x"]  # (8 + 2) / 2 bits
    assert [rows[name][2] for name in ("fp32", "int8", "int4", "int2")] == ["1.00x", "4.00x", "8.00x", "16.00x"]


def test_7b_training_is_16_bytes_per_param(capsys):
    out = run_cli(capsys, "--params", "7B")
    rows = table_rows(out)
    assert rows["Adam, fp32: 4 weights + 4 grads + 8 moments"] == ["16", "112.00"]
    mixed = [v for k, v in rows.items() if k.startswith("Adam, mixed precision")]
    assert mixed == [["16", "112.00"]]
    assert rows["inference, bf16 / fp16 weights only"] == ["2", "14.00"]
    assert "activations NOT included" in out


def test_7b_fits_on(capsys):
    fits = fits_lines(run_cli(capsys, "--params", "7e9"))
    assert fits["int4"] == "24 GB, 40 GB, 80 GB"
    assert fits["fp32"] == "40 GB, 80 GB"  # 28 GB: not on 24, on 40
    assert fits["Adam training, fp32 or mixed"] == "none (needs more than 80 GB)"
    assert fits_lines(run_cli(capsys, "--params", "7e9", "--gpus", "12", "141"))["fp16 / bf16"] == "141 GB"


def test_small_counts_switch_units(capsys):
    out = run_cli(capsys, "--params", "1.5M")
    assert "# Memory for 1,500,000 parameters (1.5M)" in out
    assert table_rows(out)["fp32"][1] == "6.00" and "| MB |" in out


def test_every_format_is_described():
    assert set(STORED_AS) == set(WEIGHT_FORMATS)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("7e9", 7e9),
        ("7000000000", 7e9),
        ("7B", 7e9),
        ("7b", 7e9),
        ("7G", 7e9),
        ("1.5M", 1.5e6),
        ("350m", 3.5e8),
        ("0.1B", 1e8),
        ("12k", 12_000),
        ("1.2T", 1.2e12),
        (" 13 B ", 13e9),
        ("1_000", 1000),
    ],
)
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["", "B", "7x", "7 KB", "-7B", "0", "nan", "inf", "1.5", "1.2345K", "1e400"])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError, match="params must be"):
        parse_count(text)


def test_bad_params_is_an_argparse_error(capsys):
    err = cli_error(capsys, "--params", "7x")
    assert "argument --params" in err and "7B" in err and "'7x'" in err


def test_sources_are_mutually_exclusive_and_required(capsys):
    assert "not allowed with argument --params" in cli_error(capsys, "--params", "7B", "--ckpt", "x.ckpt")
    assert "one of the arguments --params --model --ckpt is required" in cli_error(capsys)
    assert "argument --gpus" in cli_error(capsys, "--params", "7B", "--gpus", "0")


def test_model_counts_parameters(capsys):
    assert model_params("lightning_compress.examples.models:SmallCNN") == 38_282
    out = run_cli(capsys, "--model", "lightning_compress.examples.models:SmallCNN")
    assert "38,282 parameters" in out and "| KB |" in out


def test_bad_model_is_an_argparse_error(capsys):
    assert "'dotted.module:Callable'" in cli_error(capsys, "--model", "lightning_compress.examples.models")
    assert "No module named" in cli_error(capsys, "--model", "no_such_module:Net")
    assert "argument --model" in cli_error(capsys, "--model", "lightning_compress.examples.models:NoSuchNet")


def test_ckpt_state_dict(tmp_path, capsys):
    path = tmp_path / "linear.pt"
    torch.save(nn.Linear(10, 3).state_dict(), path)
    assert checkpoint_params(path) == (33, "state dict, 2 tensors, torch.load(weights_only=True)")
    assert "33 parameters" in run_cli(capsys, "--ckpt", str(path))


def test_ckpt_with_pickled_objects_needs_trust(tmp_path, capsys):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": nn.Linear(4, 5).state_dict(), "epoch": 3, "hyper_parameters": {"x": Opaque()}}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match="pass --trust-pickle"):
        checkpoint_params(path)
    with pytest.raises(SystemExit):
        main(["--ckpt", str(path)])
    assert "--trust-pickle" in capsys.readouterr().err
    assert "25 parameters" in run_cli(capsys, "--ckpt", str(path), "--trust-pickle")
    count, how = checkpoint_params(path, trust_pickle=True)
    assert count == 25 and how.startswith("Lightning checkpoint state_dict") and "weights_only=False" in how


def test_ckpt_tied_weights_count_once(tmp_path):
    shared = torch.zeros(6, 7)
    path = tmp_path / "tied.pt"
    torch.save({"embed.weight": shared, "head.weight": shared, "head.bias": torch.zeros(6)}, path)
    assert checkpoint_params(path)[0] == 48


def test_ckpt_safetensors(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 5, dtype=torch.bfloat16), "b": torch.zeros(5), "s": torch.tensor(1.0)}, path)
    assert checkpoint_params(path)[0] == 26
    assert "26 parameters" in run_cli(capsys, "--ckpt", str(path))


def test_bad_ckpt_is_an_argparse_error(tmp_path, capsys):
    assert "ckpt must be an existing file" in cli_error(capsys, "--ckpt", str(tmp_path / "missing.ckpt"))
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    assert "must hold a state dict of tensors" in cli_error(capsys, "--ckpt", str(tmp_path / "empty.pt"))


def test_module_runs_as_a_script():
    cmd = [sys.executable, "-m", "lightning_compress.size", "--params", "7e9"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| Adam, fp32: 4 weights + 4 grads + 8 moments | 16 | 112.00 |" in result.stdout


def test_the_cli_starts_without_importing_lightning_and_public_names_resolve():
    code = "import sys, lightning_compress.size; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    import lightning_compress

    assert sorted(lightning_compress.__all__) == sorted(lightning_compress._HOMES)
    assert all(callable(getattr(lightning_compress, name)) for name in lightning_compress.__all__)


def test_ckpt_counts_parameters_not_buffers(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    path = tmp_path / "bn.pt"
    torch.save(model.state_dict(), path)
    params = sum(p.numel() for p in model.parameters())  # 40 conv + 8 BatchNorm affine = 48
    out = run_cli(capsys, "--ckpt", str(path))
    assert f"{params} parameters" in out and "3 buffers not counted" in out


def test_exported_model_counts_its_layers_at_their_logical_shapes(tmp_path, capsys):
    from lightning_compress.export.io import save_exported
    from lightning_compress.export.plan import export_for_inference

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8), torch.nn.LayerNorm(8))
    params = sum(p.numel() for p in model.parameters())
    path = save_exported(export_for_inference(model.eval(), weights="int4", group_size=32, tokens=8), tmp_path / "m")
    for target in (path, path / "model.safetensors"):  # the directory, or its weights file
        assert f"{params} parameters" in run_cli(capsys, "--ckpt", str(target)).replace(",", "")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_ckpt_is_an_argparse_error_naming_the_file(tmp_path, capsys, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"model{suffix}"
    state = {"w": torch.randn(64, 64)}
    torch.save(state, path) if suffix == ".ckpt" else save_file(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert f"ckpt '{path}' is truncated or corrupt" in cli_error(capsys, "--ckpt", str(path))
