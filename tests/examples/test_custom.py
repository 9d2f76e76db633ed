"""The README's "Your own model" section, run as written: its commands train the user's own ResCNN and
DataModule from a config folder outside conf/, and its Python snippet adds the callbacks to a plain Trainer."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_compress.examples.custom import MyDigitsDataModule, ResCNN

ROOT = Path(__file__).resolve().parents[2]


def readme_section(title: str = "Your own model") -> str:
    """The text of the README's ``## {title}`` section, up to the next ``## `` heading."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.M | re.S)


def readme_commands() -> list[list[str]]:
    """The ``python scripts/train.py ...`` lines of the section's bash blocks, split as the shell would."""
    lines = [ln for block in code_blocks(readme_section(), "bash") for ln in block.splitlines()]
    return [shlex.split(ln, comments=True) for ln in lines if ln.startswith("python scripts/train.py")]


def run(cmd: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    # the README's command, then this test's run dir and a shorter run (a later override of a key wins)
    argv = [sys.executable, *cmd[1:], f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
            "trainer.max_epochs=1"]  # fmt: skip
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """``{layer: cells}`` of the compression summary's per-layer table."""
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in markdown.splitlines() if ln.startswith("| ")]
    return {r[0]: r for r in rows if r[0] not in ("layer", "**total**")}


def test_the_section_has_the_commands_for_both_recipes():
    commands = readme_commands()
    assert any("--config-dir" in c for c in commands) and any(a.startswith("hydra.searchpath=") for c in commands
                                                               for a in c)  # fmt: skip
    assert {a for c in commands for a in c if a.startswith("+compress=")} == {"+compress=prune_24",
                                                                              "+compress=qat_int8"}  # fmt: skip
    assert all("model=rescnn" in c and "data=my_digits" in c for c in commands)


def test_rescnn_has_the_layers_the_section_names():
    model = ResCNN()
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert names == ["stem", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2", "head"]
    assert model.stem.weight.shape[1] == 1  # the 1-channel stem that 2:4 must skip
    data = MyDigitsDataModule()
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    assert model(x).shape == (64, 10) and y.shape == (64,)
    assert sum(len(data.parts[s]) for s in ("train", "val", "test")) == 1797


@pytest.mark.slow
def test_readme_commands_train_the_own_model_with_each_recipe(tmp_path):
    for i, cmd in enumerate(readme_commands()):
        run_dir = tmp_path / str(i)
        proc = run(cmd, run_dir)
        assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stderr[-3000:]}"
        assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "report.md").is_file()
        rows = table_rows(proc.stdout)
        assert set(rows) == {"stem", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2", "head"}
        state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        if "+compress=prune_24" in cmd:
            assert "layer 'stem' (input width 1) skipped: not divisible by M=4" in proc.stdout + proc.stderr
            assert rows["stem"][5] == "dense" and bool(torch.all(state["stem.weight"] != 0))
            for name in set(rows) - {"stem"}:
                assert rows[name][5] == "2:4", rows[name]
                weight = state[f"{name}.weight"]
                groups = (weight.movedim(1, -1) if weight.dim() == 4 else weight).reshape(-1, 4)
                assert torch.all(torch.count_nonzero(groups, dim=1) == 2), name
        else:  # qat_int8: every layer's weights are int8
            assert all(r[6] == "8" for r in rows.values()), rows


@pytest.mark.slow
def test_readme_python_snippet_runs(tmp_path):
    (snippet,) = code_blocks(readme_section(), "python")
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "lightning_logs").is_dir()
