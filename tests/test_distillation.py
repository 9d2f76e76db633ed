"""DistillationModule: frozen teacher, student-only checkpoints, caching, hidden losses, DDP, bf16, compression."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_compress import DistillationModule, QATFakeQuant
from lightning_compress.distillation import student_from_teacher, transformer_blocks
from lightning_compress.nn.fake_quant import is_fake_quant
from tests.ddp import CloseProcessGroup

VOCAB, SEQ = 50, 12


def tiny_classifier(layers=4, hidden=32, labels=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, num_labels=labels)  # fmt: skip
    return BertForSequenceClassification(cfg)


def token_data(n=64, seed=0):
    """Dict samples whose label says whether token 7 occurs: learnable from the tokens alone."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, torch.randint(0, SEQ, (int(labels.sum()),), generator=g)] = 7
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]  # fmt: skip


def loader(n=64, shuffle=False):
    return DataLoader(token_data(n), batch_size=16, shuffle=shuffle)


def trainer(**kwargs):
    args = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)  # fmt: skip
    return pl.Trainer(**{**args, **kwargs})


def test_student_from_teacher_copies_embeddings_and_every_other_layer():
    teacher = tiny_classifier(layers=4)
    student = student_from_teacher(teacher)
    assert len(transformer_blocks(student)) == 2 and student.config.num_hidden_layers == 2
    assert len(transformer_blocks(teacher)) == 4  # the teacher is untouched
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for s_idx, t_idx in ((0, 0), (1, 2)):
        for key, value in s_sd.items():
            if key.startswith(f"bert.encoder.layer.{s_idx}."):
                assert torch.equal(value, t_sd[key.replace(f"layer.{s_idx}.", f"layer.{t_idx}.")])
    assert torch.equal(s_sd["bert.embeddings.word_embeddings.weight"], t_sd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(s_sd["classifier.weight"], t_sd["classifier.weight"])
    with pytest.raises(ValueError, match=r"layers=\[0, 4\] must be increasing distinct block indices in \[0, 4\)"):
        student_from_teacher(teacher, [0, 4])


def test_kd_term_is_zero_when_the_student_is_the_teacher():
    teacher = tiny_classifier().eval()
    module = DistillationModule(copy.deepcopy(teacher).eval(), teacher, temperature=4.0, alpha=1.0)
    batch = next(iter(loader()))
    assert module.losses(batch)["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_is_frozen_absent_from_optimizer_and_checkpoint(tmp_path):
    teacher = tiny_classifier()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher)
    module = DistillationModule(student, teacher, temperature=2.0, alpha=0.5, hidden_loss="cosine", lr=1e-3)
    t = trainer(max_epochs=2)
    t.fit(module, loader(), loader(32))
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    assert opt_params == {id(p) for p in student.parameters()}
    t.save_checkpoint(tmp_path / "kd.ckpt")
    ckpt = torch.load(tmp_path / "kd.ckpt", weights_only=True)
    fresh = student_from_teacher(tiny_classifier())
    fresh.load_state_dict(ckpt["state_dict"], strict=True)  # the checkpoint is the student alone
    batch = next(iter(loader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(fresh.eval()(**inputs).logits, student.eval()(**inputs).logits)


def test_distillation_improves_the_student_and_resume_restores_it(tmp_path):
    teacher = tiny_classifier(layers=2, seed=1)
    trainer(max_epochs=8).fit(
        DistillationModule(teacher, tiny_classifier(layers=2, seed=2), alpha=0.0, lr=3e-3), loader(256, shuffle=True)
    )  # fmt: skip  (alpha=0: the "teacher" learns from labels)
    student = student_from_teacher(teacher, [0])
    module = DistillationModule(student, teacher, temperature=4.0, alpha=0.5, lr=3e-3)
    t = trainer(max_epochs=3, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(module, loader(256, shuffle=True), loader(64))
    acc = t.validate(module, loader(64), verbose=False)[0]["val/acc"]
    assert acc > 0.7
    ckpt = next((tmp_path).rglob("*.ckpt"))
    resumed = DistillationModule(student_from_teacher(teacher, [0]), teacher, temperature=4.0, alpha=0.5)
    trainer(max_epochs=3).validate(resumed, loader(64), ckpt_path=ckpt, verbose=False)
    for a, b in zip(resumed.student.parameters(), module.student.parameters(), strict=True):
        assert torch.equal(a, b)


def test_cached_teacher_logits_are_computed_once_per_sample():
    teacher = tiny_classifier()
    module = DistillationModule(student_from_teacher(teacher), teacher, cache_teacher=True)
    calls = []
    teacher.register_forward_hook(lambda m, a, out: calls.append(1))  # after the copy: counts the teacher only
    trainer(max_epochs=3, limit_val_batches=0).fit(module, loader(64, shuffle=True))
    assert len(calls) == 4  # 64 samples in batches of 16, in the first epoch only
    assert len(module.teacher_cache) == 64


def test_projection_between_different_widths():
    teacher, student = tiny_classifier(hidden=32), tiny_classifier(layers=2, hidden=16)
    with pytest.raises(ValueError, match="widths 16 .student. and 32 .teacher. needs projection=True"):
        DistillationModule(student, teacher, hidden_loss="mse")
    module = DistillationModule(student, teacher, hidden_loss="mse", projection=True, layer_map=[1, 3])
    assert set(module.projections) == {"0", "1"} and module.projections["0"].weight.shape == (32, 16)
    loss = module.losses(next(iter(loader())))
    loss["loss"].backward()
    assert module.projections["0"].weight.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher": tiny_classifier(labels=3)}, "student predicts 2 classes and the teacher 3"),
        ({"hidden_loss": "cosine", "layer_map": [0, 5]}, r"layer_map=\[0, 5\] is out of range"),
        ({"hidden_loss": "l2"}, "hidden_loss='l2' is not supported"),
        ({"temperature": 0}, "temperature must be a positive number"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"cache_teacher": True, "hidden_loss": "cosine"}, "cannot be combined"),
    ],
)
def test_bad_input_fails_at_construction(kwargs, match):
    args = {"student": tiny_classifier(layers=2), "teacher": tiny_classifier(), **kwargs}
    with pytest.raises(ValueError, match=match):
        DistillationModule(**args)


def test_composes_with_qat_on_the_student_in_bf16():
    teacher = tiny_classifier()
    module = DistillationModule(student_from_teacher(teacher), teacher, temperature=2.0)
    qat = QATFakeQuant(bits=8, targets=r"student\..*")
    trainer(max_epochs=1, precision="bf16-mixed", callbacks=[qat]).fit(module, loader(), loader(32))
    assert qat.layers and all(n.startswith("student.") for n in qat.layers)
    assert all(is_fake_quant(m) for m in qat.layers.values())


class SaveStudent(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(pl_module.student.state_dict(), self.path)


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    teacher = tiny_classifier()
    module = DistillationModule(student_from_teacher(teacher), teacher, hidden_loss="cosine", lr=1e-3)
    callbacks = [SaveStudent(tmp_path / "s.pt"), CloseProcessGroup()]
    trainer(devices=2, strategy="ddp_spawn", callbacks=callbacks).fit(module, loader())
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    start = student_from_teacher(teacher).state_dict()
    assert any(not torch.equal(state[k], start[k]) for k in start)  # it trained


def test_predict_runs_the_student():
    teacher = tiny_classifier()
    module = DistillationModule(None, teacher, student_layers=[1])
    preds = trainer().predict(module, loader(32))
    batch = next(iter(loader(32)))
    expected = module.student.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(preds[0], expected)
    assert len(transformer_blocks(module.student)) == 1


def test_a_student_copied_from_a_frozen_teacher_is_trainable():
    teacher = tiny_classifier().eval().requires_grad_(False)
    module = DistillationModule(None, teacher)
    assert module.student.training and all(p.requires_grad for p in module.student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
