"""QAT and distillation on causal LMs: the PTQ start, token-level distillation, held 2:4 masks, exact resume and
the export of the result, on a tiny Llama inside CausalLMModule."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_compress import DistillationModule, GPTQFinalize, IterativePruning, QATFakeQuant
from lightning_compress.callbacks.sparsegpt import SparseGPTPrune
from lightning_compress.examples.causal_lm import CausalLMModule, TokenWindows
from lightning_compress.functional.distill import kd_loss, top_k_kd_loss, top_k_logits
from lightning_compress.nn.fake_quant import is_fake_quant
from tests.tiny_models import VOCAB, tiny_llama

SEQ = 16


def windows(n: int = 16, seed: int = 0) -> TokenWindows:
    return TokenWindows(torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed)))


def loader(n: int = 16) -> DataLoader:
    return DataLoader(windows(n), batch_size=4, shuffle=False)


def trainer(tmp_path, callbacks, steps: int = 4, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                      **kwargs)  # fmt: skip


def gptq(**kwargs) -> GPTQFinalize:
    return GPTQFinalize(bits=3, symmetric=False, num_batches=2, **kwargs)


def student_logits(module: pl.LightningModule, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()


class StartLogits(pl.Callback):
    """The module's logits on one batch at train start (after every callback's fit-start work)."""

    def __init__(self, batch: dict) -> None:
        self.batch, self.logits = batch, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.logits = student_logits(pl_module, self.batch)


@pytest.mark.parametrize("group_size", [None, 16])
def test_qat_starts_exactly_at_gptqs_result_and_learns_from_there(tmp_path, group_size):
    batch = next(iter(loader()))
    reference = CausalLMModule(model=tiny_llama())
    gptq(group_size=group_size).apply(reference, list(loader())[:2])  # GPTQ alone, in place: the expected start
    ptq = GPTQFinalize(bits=3, symmetric=False, num_batches=2, group_size=group_size)
    qat = QATFakeQuant(bits=3, symmetric=False, group_size=group_size, lsq=True, init_from=ptq)
    module, start = CausalLMModule(model=tiny_llama(), lr=1e-3), StartLogits(batch)
    trainer(tmp_path, [qat, start]).fit(module, loader())
    assert torch.equal(start.logits, student_logits(reference, batch))  # the PTQ model, exactly
    names = set(ptq.quantized)
    assert names == set(qat.layers) and "model.lm_head" not in names and len(names) == 14  # 2 blocks x 7 Linears
    for name, layer in qat.layers.items():
        ptq_weight, trained = ptq.quantized[name].weight, qat.quantized[name].weight
        assert torch.equal(trained.zero_point, ptq_weight.zero_point)  # zero-points stay GPTQ's
        assert trained.scale.shape == ptq_weight.scale.shape and not torch.equal(trained.scale, ptq_weight.scale)
        assert torch.equal(layer.weight.detach(), trained.dequantize())  # converted onto the learned grid
    assert not torch.equal(student_logits(module, batch), start.logits)


def test_qat_from_a_ptq_start_refuses_a_mismatched_grid_before_anything_runs():
    with pytest.raises(ValueError, match="differs from QATFakeQuant"):
        QATFakeQuant(bits=4, symmetric=False, init_from=gptq())
    with pytest.raises(ValueError, match="static_groups=True"):
        QATFakeQuant(bits=3, symmetric=False, group_size=8, lsq=True, init_from=gptq(group_size=8, static_groups=False))
    with pytest.raises(ValueError, match="the layers are the PTQ callback's selection"):
        QATFakeQuant(bits=3, symmetric=False, init_from=gptq(), ignore=["x"])
    with pytest.raises(TypeError, match="allowed: None, GPTQFinalize or AWQCalibrate"):
        QATFakeQuant(bits=3, init_from=SparseGPTPrune(pattern="2:4"))


def test_token_level_distillation_is_the_mean_kl_over_real_next_tokens():
    torch.manual_seed(0)
    student, teacher = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(loader()))
    batch["attention_mask"][0, -4:] = 0  # padding: its positions are no samples
    module = DistillationModule(CausalLMModule(model=student), teacher, temperature=2.0, alpha=0.5)
    losses = module.losses(batch)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kl, ce, n = 0.0, 0.0, 0
    for b in range(4):  # slow reference: every real next token one by one
        for i in range(SEQ - 1):
            if batch["attention_mask"][b, i + 1]:
                p_t = F.softmax(t[b, i] / 2, -1)
                kl += (p_t * (p_t.log() - F.log_softmax(s[b, i] / 2, -1))).sum() * 4
                ce += F.cross_entropy(s[b, i], batch["input_ids"][b, i + 1])
                n += 1
    assert torch.allclose(losses["kd"], kl / n, rtol=1e-5) and torch.allclose(losses["ce"], ce / n, rtol=1e-5)
    assert torch.allclose(losses["loss"], 0.5 * losses["kd"] + 0.5 * losses["ce"])
    frugal = DistillationModule(CausalLMModule(model=student), teacher, temperature=2.0, alpha=0.5,
                                teacher_batch_size=3, top_k=VOCAB)  # fmt: skip
    assert torch.allclose(frugal.losses(batch)["kd"], losses["kd"], rtol=1e-5)  # micro-batches, top-k = all: same


def test_top_k_kd_equals_kd_with_every_class_and_bounds_it_with_fewer():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 20), torch.randn(3, 5, 20)
    mask = torch.rand(3, 5) > 0.3
    full = kd_loss(s, t, 1.5, mask)
    assert torch.allclose(top_k_kd_loss(s, *top_k_logits(t, 20), 1.5, mask), full, rtol=1e-5)
    few = top_k_kd_loss(s, *top_k_logits(t, 4), 1.5, mask)
    assert few.item() > 0 and not torch.allclose(few, full)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\]"):
        top_k_logits(t, 21)


def test_distillation_with_a_bf16_teacher_and_cached_top_k_trains_a_quantized_student(tmp_path):
    teacher = tiny_llama()
    student = CausalLMModule(model=copy.deepcopy(teacher), lr=1e-3)
    module = DistillationModule(student, teacher, alpha=1.0, teacher_dtype="bfloat16", top_k=8, cache_teacher=True,
                                teacher_batch_size=2)  # fmt: skip
    assert next(teacher.parameters()).dtype == torch.bfloat16
    qat = QATFakeQuant(bits=4, symmetric=False, lsq=True, init_from=GPTQFinalize(bits=4, num_batches=1))
    trainer(tmp_path, [qat], steps=8, precision="bf16-mixed").fit(module, loader())  # two epochs: cache reused
    cached = next(iter(module.teacher_cache.values()))
    assert len(module.teacher_cache) == 16 and cached[0].shape == cached[1].shape == (SEQ, 8)  # top-8 per token
    assert all(is_fake_quant(m) for m in qat.layers.values()) and qat.converted
    metrics = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(module, loader(8))[0]
    assert 1 < metrics["test/perplexity"] < 2 * VOCAB


def test_sparse_fine_tuning_holds_sparsegpts_2_4_masks_while_distilling(tmp_path):
    teacher = tiny_llama()
    reference = CausalLMModule(model=copy.deepcopy(teacher))
    expected = SparseGPTPrune(pattern="2:4").apply(reference, list(loader())[:2])
    pruning = IterativePruning(init_from=SparseGPTPrune(pattern="2:4", num_batches=2))
    module = DistillationModule(CausalLMModule(model=copy.deepcopy(teacher), lr=1e-3), teacher, alpha=1.0)
    start = StartLogits(next(iter(loader())))
    trainer(tmp_path, [pruning, start], steps=6).fit(module, loader())
    assert torch.equal(start.logits, student_logits(reference, start.batch))  # SparseGPT's pruned model, exactly
    assert {k.removeprefix("student.").removesuffix(".weight") for k in pruning.masks} == set(expected)
    for name, mask in pruning.masks.items():
        weight = module.get_parameter(name)
        assert torch.equal(mask, expected[name.removeprefix("student.").removesuffix(".weight")])
        assert (weight[~mask] == 0).all()  # nothing grew back
    assert not torch.equal(student_logits(module, start.batch), start.logits)  # it trained, 2:4 kept
    with pytest.raises(ValueError, match="schedule='oneshot'"):
        IterativePruning(schedule="cubic", init_from=SparseGPTPrune(pattern="2:4"))
    with pytest.raises(TypeError, match="only prunes"):
        IterativePruning(init_from=SparseGPTPrune(pattern="2:4", bits=4))


class StopAt(pl.Callback):
    """Stop the run after optimizer step ``step`` (a crash), the schedule still planned for the whole run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.step


def _qad(tmp_path, steps: int, ckpt_path=None, every: int | None = None):
    """QAT from GPTQ + distillation from the FP model, 8 steps (stopped after ``steps``); returns the module and the
    QAT callback."""
    pl.seed_everything(0)
    teacher = tiny_llama()
    module = DistillationModule(CausalLMModule(model=copy.deepcopy(teacher), lr=1e-3), teacher, alpha=0.7)
    qat = QATFakeQuant(bits=3, symmetric=False, lsq=True, convert=False, init_from=gptq())
    callbacks = [qat, StopAt(steps)]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    trainer(tmp_path, callbacks, steps=8).fit(module, DataLoader(windows(16), batch_size=4),
                                                  ckpt_path=ckpt_path)  # fmt: skip
    return module, qat


def test_resume_mid_fine_tune_continues_exactly(tmp_path):
    whole, whole_qat = _qad(tmp_path / "a", 8)  # 2 epochs of 4 batches
    _qad(tmp_path / "b", 4, every=4)  # stops after the first epoch, a checkpoint written there
    resumed, resumed_qat = _qad(tmp_path / "c", 8, ckpt_path=tmp_path / "b" / "step=4.ckpt")
    assert not resumed_qat.init_from.quantized  # the resumed run did not run GPTQ again: the checkpoint holds it all
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name, layer in whole_qat.layers.items():
        other = resumed_qat.layers[name].weight_quantizer
        assert torch.equal(layer.weight_quantizer.scale, other.scale)
        assert torch.equal(layer.weight_quantizer.zero, other.zero)


def test_the_fine_tuned_quantized_llm_exports_to_compressed_tensors_with_its_logits(tmp_path):
    pytest.importorskip("compressed_tensors")
    from lightning_compress.export.compressed import save_compressed
    from tests.export.test_compressed import from_pretrained

    module, qat = _qad(tmp_path, 3)
    qat.convert_layers()
    batch = next(iter(loader()))
    save_compressed(module.student.model, tmp_path / "ct")
    loaded = from_pretrained(tmp_path / "ct", dequantize=True)  # asymmetric int3: dequantized on load
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, student_logits(module, batch), atol=1e-4)
