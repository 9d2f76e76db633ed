"""Sensitivity scan, the knapsack plan, the plan file, and scripts/sensitivity.py end to end."""

import itertools
import random
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn

from lightning_compress.callbacks.pruning import load_plan
from lightning_compress.examples.images import DigitsDataModule
from lightning_compress.examples.models import ImageClassifier, SmallCNN
from lightning_compress.functional.masks import magnitude_mask
from lightning_compress.sensitivity import SensitivityResult, evaluate_accuracy, save_plan, sensitivity_scan

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _evaluator(model: nn.Module):
    """Negative squared error to the dense model's outputs on fixed inputs (0 when nothing is pruned)."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    return lambda m: -float((m(x) - reference).detach().pow(2).mean())


def _bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.int32) for k, v in model.state_dict().items()}


def test_scan_restores_the_model_bit_identically():
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = -0.0  # a signed zero must come back signed
    before, params = _bits(model), [id(p) for p in model.parameters()]
    for method in ("magnitude", "rows"):
        sensitivity_scan(model, _evaluator(model), ratios=(0.3, 0.6), method=method)
        after = _bits(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert [id(p) for p in model.parameters()] == params


def test_scan_restores_the_layer_when_evaluate_raises():
    model, calls = _model(), []
    before = _bits(model)

    def failing(m: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        sensitivity_scan(model, failing, ratios=(0.3, 0.6))
    assert all(torch.equal(before[k], v) for k, v in _bits(model).items())


def test_curve_matches_a_manual_evaluation_and_prunes_one_layer_at_a_time():
    model, zeros = _model(), []
    evaluate = _evaluator(model)

    def counting(m: nn.Module) -> float:
        zeros.append([int((m[i].weight == 0).sum()) for i in (0, 2)])
        return evaluate(m)

    result = sensitivity_scan(model, counting, ratios=(0.25, 0.5, 0.75))
    assert result.params == {"0": 48, "2": 24}
    assert result.baseline == 0.0 and result.ratios == (0.25, 0.5, 0.75)
    assert zeros == [[0, 0], [12, 0], [24, 0], [36, 0], [0, 6], [0, 12], [0, 18]]
    manual = _model()
    with torch.no_grad():
        manual[2].weight.mul_(magnitude_mask(manual[2].weight, 0.5))
    assert result.metrics["2"][1] == evaluate(manual)
    assert result.metrics["2"][2] < result.metrics["2"][0] < 0.0


def test_rows_method_zeroes_whole_rows_and_their_bias():
    model, seen = _model(), []

    def record(m: nn.Module) -> float:
        seen.append((m[0].weight.detach().clone(), m[0].bias.detach().clone()))
        return 0.0

    result = sensitivity_scan(model, record, ratios=(0.5,), targets="0", method="rows")
    assert list(result.metrics) == ["0"] and result.method == "rows"
    weight, bias = seen[1]
    dead = (weight == 0).all(dim=1)
    assert int(dead.sum()) == 4 and torch.all(bias[dead] == 0) and torch.equal(bias[~dead], model[0].bias[~dead])


def test_scan_validates_before_touching_the_model():
    model = _model()
    with pytest.raises(ValueError, match="method='heads'"):
        sensitivity_scan(model, _evaluator(model), method="heads")
    with pytest.raises(ValueError, match="1.5"):
        sensitivity_scan(model, _evaluator(model), ratios=(0.5, 1.5))
    with pytest.raises(ValueError, match="match no layer"):
        sensitivity_scan(model, _evaluator(model), targets="fc.*")


def _loss_greedy(result: SensitivityResult, target: float) -> dict[str, float]:
    """Naive greedy: repeatedly take the step (one layer to its next ratio) of least loss per pruned weight."""
    plan, total = dict.fromkeys(result.metrics, 0.0), sum(result.params.values())
    while result.plan_sparsity(plan) < target:
        steps = []
        for name, r in ((n, r) for n, r in plan.items() if r < result.ratios[-1]):
            nxt = next(q for q in result.ratios if q > r)
            cost = result.metric_at(name, r) - result.metric_at(name, nxt)
            steps.append((cost / ((nxt - r) * result.params[name] / total), name, nxt))
        _, name, nxt = min(steps)
        plan[name] = nxt
    return plan


def test_plan_is_optimal_where_greedy_is_not():
    # A is the cheapest per weight, but taking it still needs B or C; B + C together is cheaper.
    result = SensitivityResult(1.0, (0.5,), {"A": (0.9,), "B": (0.91,), "C": (0.91,)}, {"A": 200, "B": 120, "C": 120})
    plan = result.plan(0.25)
    assert plan == {"A": 0.0, "B": 0.5, "C": 0.5}
    assert result.plan_sparsity(plan) >= 0.25
    assert result.predicted_loss(plan) == pytest.approx(0.18)
    greedy = _loss_greedy(result, 0.25)
    assert greedy == {"A": 0.5, "B": 0.5, "C": 0.0}
    assert result.predicted_loss(greedy) == pytest.approx(0.19)


def _exact_sparsity(result: SensitivityResult, plan: dict[str, float]) -> Fraction:
    total = sum(result.params.values())
    return sum(Fraction(r).limit_denominator(100) * result.params[n] for n, r in plan.items()) / total


def _brute_force(result: SensitivityResult, target: float) -> float:
    """Least predicted loss over every combination meeting the target; option k is ratio k/4, tested exactly."""
    names, goal = list(result.metrics), Fraction(target).limit_denominator(100) * sum(result.params.values())
    losses = {n: [0.0, *(result.baseline - m for m in result.metrics[n])] for n in names}
    return min(
        sum(losses[n][k] for n, k in zip(names, combo, strict=True))
        for combo in itertools.product(range(4), repeat=len(names))
        if Fraction(sum(k * result.params[n] for n, k in zip(names, combo, strict=True)), 4) >= goal
    )


def test_plan_matches_exhaustive_search_on_random_cases():
    rng = random.Random(0)
    for _ in range(25):
        names = [f"l{i}" for i in range(4)]
        metrics = {n: tuple(sorted((rng.uniform(0.3, 1.0) for _ in range(3)), reverse=True)) for n in names}
        result = SensitivityResult(1.0, (0.25, 0.5, 0.75), metrics, {n: rng.randint(1, 60) for n in names})
        for target in (0.0, 0.1, 0.3, 0.5, 0.62, 0.75):
            plan = result.plan(target)
            assert _exact_sparsity(result, plan) >= Fraction(target).limit_denominator(100)
            assert result.predicted_loss(plan) == pytest.approx(_brute_force(result, target), abs=1e-12)
            coarse = result.plan(target, max_bins=5)  # floored counts: still meets the target, never better
            assert _exact_sparsity(result, coarse) >= Fraction(target).limit_denominator(100)
            assert result.predicted_loss(coarse) >= result.predicted_loss(plan) - 1e-12


def test_plan_reaches_the_largest_ratio_exactly():
    params = {"net.0": 144, "net.2": 4608, "net.6": 32768, "net.8": 640}
    ratios = tuple(round(0.1 * i, 1) for i in range(1, 10))
    result = SensitivityResult(0.99, ratios, {n: tuple(0.98 - r for r in ratios) for n in params}, params)
    assert set(result.plan(0.9).values()) == {0.9}
    assert result.plan(0.0) == dict.fromkeys(params, 0.0)


@pytest.mark.parametrize("target", [0.95, 1.0, -0.1])
def test_unreachable_targets_raise_naming_the_value(target):
    result = SensitivityResult(1.0, (0.5, 0.9), {"a": (0.9, 0.5)}, {"a": 10})
    with pytest.raises(ValueError, match=re.escape(str(target))):
        result.plan(target)


def test_result_validates_its_fields():
    with pytest.raises(ValueError, match="strictly increasing"):
        SensitivityResult(1.0, (0.5, 0.2), {"a": (0.9, 0.5)}, {"a": 10})
    with pytest.raises(ValueError, match="same layers"):
        SensitivityResult(1.0, (0.5,), {"a": (0.9,)}, {"b": 10})
    with pytest.raises(ValueError, match="'a'"):
        SensitivityResult(1.0, (0.5,), {"a": (0.9, 0.8)}, {"a": 10})


def test_save_plan_writes_the_documented_format_and_round_trips(tmp_path):
    path = tmp_path / "plan.yaml"
    save_plan({"net.0": 0.5, "net.2": 0.9}, path, 0.9)
    assert path.read_text() == (
        "# per-layer sparsity plan (written by lightning_compress.sensitivity)\n"
        "target: 0.9\nlayers:\n  net.0: 0.5\n  net.2: 0.9\n"
    )
    assert yaml.safe_load(path.read_text()) == {"target": 0.9, "layers": {"net.0": 0.5, "net.2": 0.9}}
    assert load_plan(path) == {"net.0": 0.5, "net.2": 0.9}
    with pytest.raises(ValueError, match="1.2"):
        save_plan({"net.0": 1.2}, path, 0.9)


def test_markdown_and_plot(tmp_path):
    result = SensitivityResult(
        0.98, (0.5, 0.9), {"net.0": (0.97, 0.5), "net.6": (0.98, 0.9)}, {"net.0": 144, "net.6": 32768}
    )
    table = result.to_markdown()
    assert "baseline 0.9800" in table
    assert "| layer | params | 0.5 | 0.9 |" in table
    assert "| net.6 | 32,768 | 0.9800 | 0.9000 |" in table
    assert result.plot(tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC


def test_evaluate_accuracy_counts_and_keeps_the_mode():
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    x = torch.eye(3)
    batches = [(x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([0]))]
    model.train()
    assert evaluate_accuracy(model, batches) == pytest.approx(2 / 3)
    assert model.training


def _run_script(tmp_path, *overrides):
    cmd = [sys.executable, "scripts/sensitivity.py", f"hydra.run.dir={tmp_path}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_script_trains_scans_and_writes_table_plot_and_plan(tmp_path):
    proc = _run_script(tmp_path, "train_epochs=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["net.0", "net.2", "net.6", "net.8"]
    assert all(f"| {n} |" in proc.stdout for n in names)
    assert (tmp_path / "sensitivity.md").read_text() in proc.stdout
    assert (tmp_path / "sensitivity.png").read_bytes()[:8] == PNG_MAGIC
    report = (tmp_path / "report.md").read_text()
    assert "![sensitivity](sensitivity.png)" in report and (tmp_path / "sensitivity.md").read_text() in report
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["target"] == 0.8 and list(plan["layers"]) == names
    params = {n: m.weight.numel() for n, m in SmallCNN().named_modules() if hasattr(m, "weight")}
    sparsity = sum(r * params[n.removeprefix("net.")] for n, r in plan["layers"].items()) / sum(params.values())
    assert sparsity >= 0.8 - 1e-9


@pytest.mark.slow
def test_script_scans_a_checkpoint(tmp_path):
    pl.seed_everything(0)
    model, data = ImageClassifier(SmallCNN()), DigitsDataModule()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    accuracy = evaluate_accuracy(model, data.val_dataloader())
    proc = _run_script(tmp_path / "run", f"ckpt_path={tmp_path / 'model.ckpt'}", "method=rows", "targets=[net.6,net.8]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU available" not in proc.stderr  # no Trainer was built: nothing trained
    assert f"(rows); baseline {accuracy:.4f}." in (tmp_path / "run" / "sensitivity.md").read_text()
    assert list(yaml.safe_load((tmp_path / "run" / "plan.yaml").read_text())["layers"]) == ["net.6", "net.8"]
