"""IterativePruning: methods, schedules, masks holding through training, checkpoints, resume, DDP, bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_compress import CompressionReport, IterativePruning
from lightning_compress.examples.images import DigitsDataModule
from lightning_compress.examples.models import ImageClassifier, SmallCNN
from lightning_compress.functional.schedules import cubic_sparsity, geometric_rounds
from tests.ddp import CloseProcessGroup

TRAIN_BATCHES = 20  # 1257 training digits / batch 64 = 20 batches (the last one short)


class Classifier(ImageClassifier):
    """ImageClassifier with a choice of optimizer."""

    def __init__(self, optimizer: str = "adam", **kwargs) -> None:
        super().__init__(SmallCNN(), **kwargs)
        self.optimizer_name = optimizer

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=1e-2)
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class Probe(pl.Callback):
    """After every batch (so after every optimizer step) check pruned weights and their optimizer state are 0."""

    def __init__(self, pruning: IterativePruning) -> None:
        self.pruning = pruning
        self.checks = 0
        self.epoch_sparsity: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.pruning.masks.items():
            param = pl_module.get_parameter(name)
            assert torch.all(param[~mask] == 0), f"{name} has non-zero pruned weights"
            for state in trainer.optimizers[0].state.get(param, {}).values():
                if isinstance(state, torch.Tensor) and state.shape == param.shape:
                    assert torch.all(state[~mask] == 0), f"{name}: optimizer state revives pruned weights"
            self.checks += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_sparsity.append(self.pruning.global_sparsity())


def fit(callbacks, max_epochs=2, model=None, tmp_path=None, ckpt_path=None, **trainer_kwargs):
    pl.seed_everything(0)
    model = model or Classifier()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path) if tmp_path else False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, DigitsDataModule(), ckpt_path=ckpt_path)
    return trainer, model


def weight_sparsity(model: nn.Module, name: str) -> float:
    w = model.get_parameter(f"{name}.weight")
    return 1 - int(torch.count_nonzero(w)) / w.numel()


LAYERS = ["net.0", "net.2", "net.6", "net.8"]


@pytest.mark.parametrize("schedule", ["oneshot", "iterative", "cubic"])
def test_magnitude_reaches_exact_target_per_layer(schedule):
    cb = IterativePruning(sparsity=0.8, schedule=schedule, rate=0.6, frequency=4, scope="layer")
    _, model = fit([cb], max_epochs=3)
    for name in LAYERS:
        w = model.get_parameter(f"{name}.weight")
        assert w.numel() - int(torch.count_nonzero(w)) == round(0.8 * w.numel())


def test_global_scope_ranks_all_layers_together():
    cb = IterativePruning(sparsity=0.9, scope="global")
    _, model = fit([cb], max_epochs=1)
    weights = [model.get_parameter(f"{n}.weight") for n in LAYERS]
    total = sum(w.numel() for w in weights)
    zeros = sum(w.numel() - int(torch.count_nonzero(w)) for w in weights)
    assert zeros == round(0.9 * total)
    per_layer = [weight_sparsity(model, n) for n in LAYERS]
    assert max(per_layer) - min(per_layer) > 0.2  # the big Linear takes most of the pruning


def test_scope_defaults_to_global_for_magnitude_and_to_layer_where_global_cannot_apply():
    # issue #14: per layer lost to Lightning's ModelPruning (a global ranking) on real digits; see benchmarks/pruning.py
    assert IterativePruning(sparsity=0.9, schedule="cubic").scope == "global"
    assert IterativePruning(method="nm").scope == "layer" and IterativePruning(method="rows").scope == "layer"
    assert IterativePruning(plan={"net.0": 0.5}).scope == "layer"
    assert IterativePruning(scope="layer").scope == "layer"
    with pytest.raises(ValueError, match="scope='global' needs method='magnitude'"):
        IterativePruning(method="rows", scope="global")


def test_nm_keeps_two_of_four_along_inputs_through_training():
    cb = IterativePruning(method="nm", pattern="2:4", ignore=["net\\.0"])
    probe = Probe(cb)
    _, model = fit([cb, probe], max_epochs=2)
    assert probe.checks > 0
    conv = model.get_parameter("net.2.weight").permute(0, 2, 3, 1).reshape(-1, 4)
    linear = model.get_parameter("net.6.weight").reshape(-1, 4)
    for groups in (conv, linear):
        assert torch.all(torch.count_nonzero(groups, dim=1) == 2)
    assert weight_sparsity(model, "net.0") == 0.0


def test_rows_prunes_whole_filters_and_their_bias():
    cb = IterativePruning(method="rows", sparsity=0.5, ignore=["net\\.8"])
    _, model = fit([cb], max_epochs=1)
    for name in ["net.0", "net.2", "net.6"]:
        w, b = model.get_parameter(f"{name}.weight"), model.get_parameter(f"{name}.bias")
        dead = w.reshape(w.shape[0], -1).abs().sum(dim=1) == 0
        assert int(dead.sum()) == w.shape[0] // 2
        assert torch.all(b[dead] == 0) and torch.all(w[~dead].reshape(int((~dead).sum()), -1).abs().sum(1) > 0)


@pytest.mark.parametrize(
    ("optimizer", "trainer_kwargs"),
    [
        ("sgd", {}),
        ("adam", {"accumulate_grad_batches": 3}),
        ("adamw", {"precision": "bf16-mixed"}),
    ],
)
def test_pruned_weights_stay_exactly_zero_after_every_step(optimizer, trainer_kwargs):
    cb = IterativePruning(sparsity=0.7, schedule="cubic", frequency=3)
    probe = Probe(cb)
    _, model = fit([cb, probe], max_epochs=2, model=Classifier(optimizer), **trainer_kwargs)
    # masks exist from the first pruning step (optimizer step 3) on; every later batch is checked, layer by layer
    assert probe.checks >= len(LAYERS) * (2 * TRAIN_BATCHES - 3 * 3)
    assert cb.global_sparsity() == pytest.approx(0.7, abs=2e-3)


def test_iterative_rounds_follow_geometric_levels_every_k_epochs():
    cb = IterativePruning(sparsity=0.9, schedule="iterative", rate=0.5, every_n_epochs=2)
    probe = Probe(cb)
    fit([cb, probe], max_epochs=9)
    levels = geometric_rounds(0.9, 0.5)  # 0.5, 0.75, 0.875, 0.9
    expected = [0.0, levels[0], levels[0], levels[1], levels[1], levels[2], levels[2], levels[3], levels[3]]
    assert probe.epoch_sparsity == pytest.approx(expected, abs=3e-3)
    assert cb.round == 4


def test_cubic_sparsity_follows_zhu_gupta_by_step():
    cb = IterativePruning(sparsity=0.8, schedule="cubic", begin_step=5, end_step=45, frequency=10)
    seen = {}

    class StepProbe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[cb.step] = cb.global_sparsity()

    fit([cb, StepProbe()], max_epochs=3)
    for step in (4, 5, 14, 15, 25, 35, 45, 60):
        assert seen[step] == pytest.approx(cubic_sparsity(step, 0.8, 4, 0.0, 5, 10), abs=3e-3), step


@pytest.mark.parametrize("rewind", ["init", 7])
def test_lottery_ticket_rewinds_survivors(rewind):
    cb = IterativePruning(sparsity=0.5, schedule="iterative", rate=0.5, rewind=rewind)
    captured = {}

    class RewindProbe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cb.step == (rewind if isinstance(rewind, int) else -1):
                captured.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                for name in cb.masks:
                    captured[f"after:{name}"] = pl_module.get_parameter(name).detach().clone()

    model = Classifier()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit([cb, RewindProbe()], max_epochs=1, model=model)
    for name, mask in cb.masks.items():
        reference = initial[name] if rewind == "init" else captured[name]
        assert torch.equal(captured[f"after:{name}"], reference * mask)


def test_per_layer_plan_from_dict_and_yaml(tmp_path):
    plan = {"net.2": 0.3, "net.6": 0.95}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"target": 0.9, "layers": plan}))
    for given in (plan, str(path)):
        cb = IterativePruning(sparsity=0.5, plan=given)
        _, model = fit([cb], max_epochs=1)
        assert weight_sparsity(model, "net.2") == pytest.approx(0.3, abs=1e-3)
        assert weight_sparsity(model, "net.6") == pytest.approx(0.95, abs=1e-4)
        assert weight_sparsity(model, "net.8") == pytest.approx(0.5, abs=1e-3)


class BertLikeAttention(nn.Module):
    """Just the shapes of a Hugging Face BertAttention: self.{query,key,value} and output.dense."""

    def __init__(self, hidden=16, heads=4):
        super().__init__()
        self.self = nn.Module()
        self.self.attention_head_size = hidden // heads
        for key in ("query", "key", "value"):
            setattr(self.self, key, nn.Linear(hidden, hidden))
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, hidden)


def test_heads_prune_the_same_heads_in_qkv_and_output():
    model = nn.ModuleDict({"attn": BertLikeAttention(), "mha": nn.MultiheadAttention(16, 4)})
    cb = IterativePruning(method="heads", sparsity=0.5)
    cb._units = cb.units(model)
    cb._params = {p.name: p.param for u in cb._units for p in u.parts}
    cb.prune_to(None, cb.target)
    s = model["attn"].self
    dead_rows = s.query.weight.abs().sum(dim=1) == 0
    assert int(dead_rows.sum()) == 8  # 2 of 4 heads of size 4
    assert dead_rows.reshape(4, 4).all(dim=1).sum() == 2  # whole heads
    for lin in (s.key, s.value):
        assert torch.equal(lin.weight.abs().sum(dim=1) == 0, dead_rows)
        assert torch.all(lin.bias[dead_rows] == 0)
    assert torch.equal(model["attn"].output.dense.weight.abs().sum(dim=0) == 0, dead_rows)
    mha = model["mha"]
    q, k, v = mha.in_proj_weight.reshape(3, 16, 16)
    dead = q.abs().sum(dim=1) == 0
    assert int(dead.sum()) == 8 and torch.equal(k.abs().sum(dim=1) == 0, dead)
    assert torch.equal(v.abs().sum(dim=1) == 0, dead)
    assert torch.equal(mha.out_proj.weight.abs().sum(dim=0) == 0, dead)


def test_checkpoint_loads_into_plain_model_and_resume_continues_exactly(tmp_path):
    def make():
        return IterativePruning(sparsity=0.9, schedule="iterative", rate=0.5)

    first = make()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit([first, ckpt_cb], max_epochs=2)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    plain = Classifier()
    plain.load_state_dict(ckpt["state_dict"], strict=True)  # keys unchanged
    saved = ckpt["callbacks"][first.state_key]
    assert saved["round"] == 2 and saved["step"] == 2 * TRAIN_BATCHES
    assert set(saved["masks"]) == {f"{n}.weight" for n in LAYERS}

    resumed = make()
    at_start = {}

    class StartProbe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            at_start.update({k: v.clone() for k, v in resumed.masks.items()})
            at_start["step"] = resumed.step

    fit(
        [resumed, StartProbe(), ModelCheckpoint(dirpath=tmp_path / "b")], max_epochs=4, ckpt_path=tmp_path / "last.ckpt"
    )
    assert at_start["step"] == saved["step"]
    for name, mask in saved["masks"].items():
        assert torch.equal(at_start[name], mask)  # identical masks after restore
        assert not torch.any(resumed.masks[name] & ~mask)  # nothing pruned grows back later
    assert resumed.round == 4 and resumed.step == 4 * TRAIN_BATCHES
    assert resumed.global_sparsity() == pytest.approx(0.9, abs=2e-3)


def test_sparsity_is_logged_and_in_the_summary(tmp_path):
    cb = IterativePruning(sparsity=0.6)
    report = CompressionReport(dirpath=str(tmp_path))
    trainer, model = fit([cb, report], max_epochs=1, tmp_path=tmp_path)
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "sparsity/global" in metrics and "sparsity/net.6" in metrics
    rows = {r.name: r for r in report.summary.rows}
    w = model.get_parameter("net.6.weight")
    assert rows["net.6"].nonzero == int(torch.count_nonzero(w)) + 64  # + the dense bias
    assert "| net.6 | Linear | 64×512 |" in (tmp_path / "report.md").read_text()


class MaskFingerprint(pl.Callback):
    def __init__(self, pruning, out: Path):
        self.pruning, self.out = pruning, out

    def on_fit_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name in sorted(self.pruning.masks):
            digest.update(self.pruning.masks[name].cpu().numpy().tobytes())
            digest.update(pl_module.get_parameter(name).detach().cpu().numpy().tobytes())
        (self.out / f"rank{trainer.global_rank}.txt").write_text(digest.hexdigest())


@pytest.mark.slow
def test_ddp_two_processes_hold_identical_masks(tmp_path):
    cb = IterativePruning(sparsity=0.8, schedule="cubic", frequency=3)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        callbacks=[cb, MaskFingerprint(cb, tmp_path), CloseProcessGroup()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(), DigitsDataModule())
    fingerprints = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert fingerprints[0] == fingerprints[1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 1.0}, ValueError, r"sparsity must be in \[0, 1\), got 1.0"),
        ({"method": "random"}, ValueError, r"method='random' is not supported; allowed"),
        ({"method": "nm", "pattern": "4:2"}, ValueError, "0 < N < M"),
        ({"method": "nm", "schedule": "cubic"}, ValueError, "allowed: 'oneshot'"),
        ({"rewind": "init"}, ValueError, "needs schedule='iterative'"),
        ({"scope": "global", "method": "rows"}, ValueError, "scope='global'"),
        ({"plan": {"net.6": 1.5}}, ValueError, r"plan\['net.6'\] must be in \[0, 1\)"),
        ({"plan": "/nonexistent.yaml"}, ValueError, "is not a file"),
        ({"targets": 5}, TypeError, "targets must be a regex string or a list of them, got 5"),
        ({"ignore": ["net.0", 3]}, TypeError, "ignore must be a regex string or a list of them, got 3"),
        ({"method": "nm", "sparsity": 0.9}, ValueError, r"sparsity=0.9 with method='nm'.*N:M prunes exactly 0.5"),
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs must be a positive int, got 0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        IterativePruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "nm", "targets": "net\\.0"}, r"layer 'net.0': input dimension 1 is not divisible by M=4"),
        ({"targets": "fc.*"}, r"targets='fc.\*' with ignore=None match no layer"),
        ({"plan": {"net.7": 0.5}}, r"plan names unknown layers \['net.7'\]"),
        ({"method": "heads"}, "match no layer"),
    ],
)
def test_bad_selection_fails_before_any_weight_is_touched(kwargs, match):
    model = Classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        fit([IterativePruning(**kwargs)], max_epochs=1, model=model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_cubic_resume_keeps_the_ramp_it_started_with(tmp_path):
    first = IterativePruning(sparsity=0.8, schedule="cubic", frequency=2)
    fit([first, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=1)
    end = first._end_step
    assert end == int(0.75 * TRAIN_BATCHES)  # 3/4 of the first run's 20 steps
    resumed = IterativePruning(sparsity=0.8, schedule="cubic", frequency=2)
    fit([resumed], max_epochs=3, ckpt_path=tmp_path / "last.ckpt")  # a longer run must not stretch the ramp
    assert resumed._end_step == end
    assert resumed.global_sparsity() == pytest.approx(0.8, abs=2e-3)


def test_nm_by_default_skips_layers_whose_input_width_does_not_divide_m_and_logs_them(caplog):
    model = Classifier()  # net.0 is Conv2d(1, 16): input width 1
    with caplog.at_level("WARNING", logger="lightning_compress.callbacks.pruning"):
        units = IterativePruning(method="nm", pattern="2:4").units(model)
    assert [u.name for u in units] == ["net.2", "net.6", "net.8"]
    assert "layer 'net.0' (input width 1) skipped: not divisible by M=4" in caplog.text


def test_nm_fails_when_every_selected_layer_is_skipped():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(9, 3))
    with pytest.raises(ValueError, match=r"no selected layer has an input width divisible by M=4.*'0': 1, '2': 9"):
        IterativePruning(method="nm", pattern="2:4").units(model)


def test_nm_named_layer_that_does_not_divide_is_still_an_error():
    with pytest.raises(ValueError, match=r"layer 'net.0': input dimension 1 .* selected by targets"):
        IterativePruning(method="nm", targets=["net\\.0", "net\\.2"]).units(Classifier())
