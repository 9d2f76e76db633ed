"""The budget solver: option names and sizes, the one-pass loss prediction, plans against brute force, constraints,
the plan file driving GPTQ / SparseGPT / AutoCompress, and AutoCompress at fit end with its report."""

import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import AutoCompress, CompressionReport, GPTQFinalize, QATFakeQuant, SparseGPTPrune
from lightning_compress.budget import (
    CompressionPlan,
    OptionScan,
    compressed_weight,
    option_scan,
    output_change,
    output_rows,
    parse_budget,
    parse_bytes,
    parse_option,
    plan_compression,
)
from lightning_compress.functional.gptq import hessian_update
from lightning_compress.functional.size import TensorFormat, tensor_bits
from lightning_compress.nn.fake_quant import is_fake_quant
from tests.tiny_models import tiny_llama, token_batches


def _rademacher(model, batch):
    """Σ rᵀ y with r = ±1: every squared output gradient is exactly 1, so the prediction is exactly ½‖Δy‖²."""
    y = model(batch)
    r = torch.randint(0, 2, y.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    return (y * r).sum(), y.shape[0]


# ----------------------------------------------------------------------------------------------- names and sizes


def test_option_names_spell_the_grid():
    assert parse_option("keep").bits is None
    o = parse_option("int4_g128")
    assert (o.bits, o.group_size, o.nm, o.symmetric) == (4, 128, None, False)
    o = parse_option("2:4_int8")
    assert (o.bits, o.group_size, o.nm, o.symmetric) == (8, None, (2, 4), True)
    assert parse_option("2:4").bits is None and parse_option("2:4").nm == (2, 4)
    for bad in ("int9", "int4_g0", "4:2", "fp4", "g128", "", "int4_x"):
        with pytest.raises(ValueError, match="option"):
            parse_option(bad)


def test_option_bytes_are_the_size_accounting():
    shape = (256, 512)
    assert parse_option("keep").weight_bits(shape, 32) == 256 * 512 * 32
    # int4 per group of 128: 4 bits a weight, one float32 scale + int8 zero-point per group
    assert parse_option("int4_g128").weight_bits(shape, 32) == 256 * 512 * 4 + 256 * 4 * (32 + 8)
    assert parse_option("int8").weight_bits(shape, 16) == 256 * 512 * 8 + 256 * 32  # symmetric: no zero-point
    half = 256 * 512 // 2
    assert parse_option("2:4_int8").weight_bits(shape, 32) == tensor_bits(
        256 * 512, half, TensorFormat(bits=8, n_scales=256, nm=(2, 4))
    )
    assert parse_option("2:4").weight_bits(shape, 16) == half * (16 + 2)


def test_budgets_parse_and_bad_ones_are_refused():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("1.5 MiB") == int(1.5 * 2**20) and parse_bytes(1200) == 1200
    assert parse_budget("4x") == (None, 4.0) and parse_budget("160MB") == (160 * 10**6, None)
    for bad in ("0", "-3GB", "8 parsecs", "abc", True):
        with pytest.raises(ValueError, match="budget"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="ratio budget"):
        parse_budget("0.5x")


# ------------------------------------------------------------------------------------------------- the estimate


def test_the_prediction_is_exactly_the_output_error_where_the_fisher_is_known():
    """One Linear and a ±1 probe: F = 1, so the prediction must equal the measured ½‖ΔW x‖² per row, option by
    option, each with the weight the applying solver makes."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 16, bias=False))
    x = torch.randn(96, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs: GPTQ's compensation matters
    batches = [x[:48], x[48:]]
    options = ("keep", "int8", "int4", "int3", "int4_g32", "2:4", "2:4_int8")
    scan = option_scan(layer, batches, options, loss_fn=_rademacher, micro_batch=16, estimate="solve")
    hessian = hessian_update(None, x, torch.float32)
    before = output_rows(layer, batches)
    for k, name in enumerate(options):
        copy = nn.Sequential(nn.Linear(64, 16, bias=False))
        with torch.no_grad():
            copy[0].weight.copy_(compressed_weight(parse_option(name), layer[0].weight.detach(), hessian))
        measured = output_change(before, output_rows(copy, batches))
        assert scan.losses["0"][k] == pytest.approx(measured, rel=1e-4, abs=1e-12), name
    assert scan.losses["0"][0] == 0.0
    assert scan.losses["0"][1] < scan.losses["0"][2] < scan.losses["0"][3]
    closed = option_scan(layer, batches, options, loss_fn=_rademacher, micro_batch=16)  # the closed-form default
    for k, name in enumerate(options[1:], start=1):
        assert 0.5 < closed.losses["0"][k] / scan.losses["0"][k] < 1.6, name


def test_the_scan_leaves_the_model_and_its_gradients_alone():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scan = option_scan(model, token_batches(2), ("keep", "int4", "int3"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert set(scan.losses) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    assert all(row[0] == 0 and 0 < row[1] < row[2] for row in scan.losses.values())  # int4 below int3 everywhere
    assert scan.base_loss == pytest.approx(math.log(100), rel=0.1)  # a random model over 100 tokens
    # q/k/v read one input, gate/up another: each group is one decision; o_proj, down_proj and lm_head alone
    groups = {tuple(g) for g in scan.groups}
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj") in groups  # fmt: skip
    assert ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") in groups
    assert ("model.layers.1.mlp.down_proj",) in groups


def test_the_default_probe_predicts_an_encoders_output_change():
    """No labels: the Gaussian probe's squared gradients estimate JᵀJ; the prediction of int3 on one layer lands
    near the measured change of the model's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))
    batches = [torch.randn(64, 32) for _ in range(4)]
    scan = option_scan(model, batches, ("keep", "int3"), targets=["0"], micro_batch=64)
    before = output_rows(model, batches, 64)
    hessian = sum(hessian_update(None, b, torch.float32) for b in batches)
    with torch.no_grad():
        model[0].weight.copy_(compressed_weight(parse_option("int3"), model[0].weight, hessian))
    measured = output_change(before, output_rows(model, batches, 64))
    assert 0.6 < scan.losses["0"][1] / measured < 1.6


# ------------------------------------------------------------------------------------------------- the solver


def _hand_scan() -> OptionScan:
    g = torch.Generator().manual_seed(3)
    names = ["a", "b", "c", "d", "e"]
    losses = {n: (0.0, *sorted(torch.rand(3, generator=g).tolist())) for n in names}
    losses["e"] = (0.0, 0.1, math.inf, 0.4)  # e cannot take option 2 (say, its width)
    bits = {n: (3200, 800 + 100 * i, 600 + 50 * i, 400) for i, n in enumerate(names)}
    return OptionScan(("keep", "int8", "int4", "int3"), losses, bits, [["a", "b"], ["c"], ["d"], ["e"]], 1000)


def _brute_force(scan: OptionScan, budget_bits: float):
    best = None
    for picks in itertools.product(range(4), repeat=len(scan.groups)):
        plan = {n: scan.options[k] for g, k in zip(scan.groups, picks, strict=True) for n in g}
        size = scan.total_bytes(plan) * 8
        loss = scan.predicted_loss(plan)
        if size <= budget_bits and math.isfinite(loss) and (best is None or loss < best):
            best = loss
    return best


def test_plans_are_the_brute_force_optimum_and_honour_groups_and_refusals():
    scan = _hand_scan()
    smallest = scan.total_bytes(scan.uniform("int3"))
    for budget in (smallest, smallest + 40, smallest + 150, smallest + 400, 5000):
        plan = scan.plan(budget_bytes=budget)
        assert plan.total_bytes <= budget
        assert plan.predicted_loss == pytest.approx(_brute_force(scan, budget * 8), abs=1e-12)
        assert plan.layers["a"] == plan.layers["b"] and plan.layers["e"] != "int4"
        assert plan.lower_bound <= plan.predicted_loss + 1e-12
    ratio = scan.plan(ratio=2.0)
    assert ratio.total_bytes <= scan.total_bytes(scan.uniform("keep")) / 2
    with pytest.raises(ValueError, match="cannot be met: the smallest plan takes"):
        scan.plan(budget_bytes=smallest - 1)
    with pytest.raises(ValueError, match="exactly one"):
        scan.plan(budget_bytes=3000, ratio=2)


def test_a_loss_budget_gives_the_smallest_plan_within_it():
    scan = _hand_scan()
    for limit in (0.0, 0.2, 0.6, 1.5, 10.0):
        plan = scan.plan(max_loss_increase=limit)
        assert plan.predicted_loss <= limit + 1e-12
        cheapest = min(
            scan.total_bytes(p)
            for picks in itertools.product(range(4), repeat=len(scan.groups))
            if scan.predicted_loss(
                p := {n: scan.options[k] for g, k in zip(scan.groups, picks, strict=True) for n in g}
            )
            <= limit + 1e-12  # fmt: skip
        )
        assert plan.total_bytes == cheapest
    assert scan.plan(max_loss_increase=0.0).layers == scan.uniform("keep")


def test_options_a_layer_cannot_take_are_never_planned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))  # 6 inputs: no 2:4, no groups of 4
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    scan = option_scan(model, [(x, y)], ("keep", "int8", "int4_g4", "2:4"))
    assert math.isfinite(scan.losses["0"][2]) and math.isfinite(scan.losses["0"][3])
    assert scan.losses["2"][2] == math.inf and scan.losses["2"][3] == math.inf
    for budget in range(int(scan.total_bytes(scan.uniform("int8"))), int(scan.total_bytes(scan.uniform("keep")))):
        assert scan.plan(budget_bytes=budget).layers["2"] in ("keep", "int8")
    with pytest.raises(ValueError, match="one N:M pattern"):
        option_scan(model, [(x, y)], ("2:4", "4:8"))
    with pytest.raises(ValueError, match="distinct"):
        option_scan(model, [(x, y)], ("int4", "int4"))


# ------------------------------------------------------------------------------------ the plan drives the solvers


def _llama_plan(model) -> CompressionPlan:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    cycle = ["int4", "int8", "int3_g16", "2:4_int8", "keep", "2:4"]
    return CompressionPlan({n: cycle[i % len(cycle)] for i, n in enumerate(names)}, 0.1, 1000.0)


def test_a_plan_file_round_trips_and_drives_gptq_and_sparsegpt_layer_by_layer(tmp_path):
    model = tiny_llama()
    plan = _llama_plan(model)
    path = plan.save(tmp_path / "plan.yaml")
    assert path.read_text().startswith("# per-layer compression plan")
    assert CompressionPlan.load(path) == plan
    original = {k: v.clone() for k, v in model.state_dict().items()}
    auto = AutoCompress(plan=str(path), num_batches=None)
    auto.apply(model, token_batches(4))
    for name, option in plan.layers.items():
        o, layer = parse_option(option), model.get_submodule(name)
        w = layer.weight.detach()
        if o.nm is not None:  # exactly 2 of every 4 inputs kept
            assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()), name
        if o.bits is None:
            assert not is_fake_quant(layer) and name not in auto.quantized
            if o.nm is None:
                assert torch.equal(w, original[f"{name}.weight"]), name  # keep: bit-identical
            continue
        q = auto.quantized[name].weight
        assert is_fake_quant(layer) and (q.bits, q.group_size) == (o.bits, o.group_size), name
        assert (q.zero_point is None) == o.symmetric, name
    assert set(auto.masks) == set(plan.sparse())
    assert "lm_head" not in auto.quantized and torch.equal(model.lm_head.weight, original["lm_head.weight"])


def test_gptq_and_sparsegpt_take_a_plan_and_check_it_before_touching_the_model(tmp_path):
    model = tiny_llama()
    plan = _llama_plan(model)
    gptq = GPTQFinalize(plan=plan)
    assert set(gptq.layer_options) == set(plan.quantized())
    assert gptq.options_of("model.layers.0.self_attn.v_proj").group_size == 16  # int3_g16
    assert SparseGPTPrune(plan=plan).nm == (2, 4)
    with pytest.raises(ValueError, match="targets"):
        GPTQFinalize(plan=plan, targets=["q_proj"])
    with pytest.raises(ValueError, match="must stay None"):
        SparseGPTPrune(plan=plan, pattern="2:4")
    with pytest.raises(ValueError, match="prunes no layer"):
        SparseGPTPrune(plan=CompressionPlan({"model.layers.0.mlp.up_proj": "int4"}))
    with pytest.raises(ValueError, match="is not a file"):
        GPTQFinalize(plan=str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"layers": {"model.layers.0.mlp.up_proj": "int17"}}))
    with pytest.raises(ValueError, match="bits must be 2..8"):
        AutoCompress(plan=str(tmp_path / "bad.yaml"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = CompressionPlan({**plan.layers, "model.layers.9.mlp.up_proj": "int4"})
    with pytest.raises(ValueError, match="layers.9"):
        AutoCompress(plan=wrong).apply(model, token_batches(2))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(is_fake_quant(m) for m in model.modules())


def test_auto_compress_refuses_bad_budgets_at_construction():
    for kwargs, match in [
        ({}, "exactly one"),
        ({"budget": "8GB", "max_loss_increase": 0.1}, "exactly one"),
        ({"budget": "lots"}, "budget"),
        ({"budget": "0.5x"}, "ratio budget"),
        ({"max_loss_increase": -1}, "max_loss_increase"),
        ({"budget": "8GB", "options": ["int4", "int5_g"]}, "option"),
        ({"plan": CompressionPlan({"a": "int4"}), "budget": "8GB"}, "whole recipe"),
    ]:
        with pytest.raises(ValueError, match=match):
            AutoCompress(**kwargs)


def test_auto_compress_one_shot_fits_the_budget_and_beats_uniform_int3_on_a_tiny_llama(tmp_path):
    model = tiny_llama(hidden=64)
    batches = token_batches(6, batch=4, seq=32)
    scan = option_scan(model, batches, ("keep", "int8", "int4", "int3", "2:4_int8"), ignore=["lm_head"])
    int3, int4 = (scan.total_bytes(scan.uniform(o)) for o in ("int3", "int4"))
    assert scan.plan(budget_bytes=int3).layers == scan.uniform("int3")  # the only plan this small
    budget = (int3 + int4) / 2
    plan = scan.plan(budget_bytes=budget)
    assert plan.total_bytes <= budget and plan.predicted_loss < scan.predicted_loss(scan.uniform("int3"))
    assert set(plan.layers.values()) - {"int3"}  # some layers got more bits
    same = plan_compression(model, batches, budget_bytes=budget, options=scan.options, ignore=["lm_head"])
    assert same.layers == plan.layers  # deterministic
    auto = AutoCompress(
        budget=int(budget), options=scan.options, ignore=["lm_head"], save_plan=str(tmp_path / "p.yaml")
    )
    auto.apply(model, batches)
    assert CompressionPlan.load(tmp_path / "p.yaml").layers == plan.layers == auto.plan.layers
    assert math.isfinite(auto.measured_loss_increase) and auto.measured_loss_increase > 0


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_auto_compress_at_fit_end_writes_the_plan_and_the_report_shows_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :4].argmax(dim=1)).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = _Classifier()
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    auto = AutoCompress(budget="5x", save_plan=str(tmp_path / "plan.yaml"), num_batches=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, callbacks=[auto, CompressionReport(dirpath=str(tmp_path))],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, loader)
    plan = CompressionPlan.load(tmp_path / "plan.yaml")
    assert plan.total_bytes <= fp32_bytes / 5 and plan.layers == auto.plan.layers
    assert set(auto.quantized) == set(plan.quantized())
    report = (tmp_path / "report.md").read_text()
    assert "## Plan" in report and "Predicted loss increase" in report and "measured" in report
    assert (tmp_path / "plan.png").stat().st_size > 1000
    accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.8  # still a classifier at a fifth of the bytes


def test_qat_takes_a_plan_layer_by_layer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    loader = DataLoader(TensorDataset(x, x[:, :4].argmax(dim=1)), batch_size=32)
    plan = CompressionPlan({"net.0": "int4_g8", "net.2": "int8", "net.4": "keep"})
    qat = QATFakeQuant(plan=plan)
    model = _Classifier()
    pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[qat], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(model, loader)  # fmt: skip
    assert set(qat.quantized) == {"net.0", "net.2"} and not is_fake_quant(model.net[4])
    w0, w2 = qat.quantized["net.0"].weight, qat.quantized["net.2"].weight
    assert (w0.bits, w0.group_size, w0.zero_point is None) == (4, 8, False)
    assert (w2.bits, w2.group_size, w2.zero_point is None) == (8, None, True)
    with pytest.raises(ValueError, match="must stay None"):
        QATFakeQuant(plan=plan, targets=["net.0"])
    with pytest.raises(ValueError, match="lacks: \\['net.9'\\]"):
        QATFakeQuant(plan=CompressionPlan({"net.0": "int4", "net.9": "int4"})).select(_Classifier())


@pytest.mark.slow
def test_ptq_script_searches_applies_and_reports_a_plan(tmp_path):
    from tests.test_ptq_script import _metric, run_causal_lm

    # a random model's bytes are mostly its embeddings: a loss budget rather than a size
    proc = run_causal_lm(tmp_path, "+compress=auto", "budget=null", "+callbacks.auto.max_loss_increase=0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    plan = CompressionPlan.load(run / "plan.yaml")
    assert plan.total_bytes == pytest.approx(_metric(proc.stdout, "plan_bytes"), abs=1e-3)
    assert math.isfinite(_metric(proc.stdout, "measured_loss_increase"))
    assert _metric(proc.stdout, "predicted_loss_increase") == pytest.approx(
        plan.predicted_loss, abs=1e-4
    )  # printed .4f
    assert "## Plan" in (run / "report.md").read_text() and (run / "plan.png").exists()
