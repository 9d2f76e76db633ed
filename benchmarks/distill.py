"""Distillation: all-MiniLM-L6-v2 (fine-tuned on Brown genre groups) -> 3-layer student, side by side with the same
student trained on hard labels only; parameter ratio and CPU inference speed-up at batch 32 x 128 tokens."""

from __future__ import annotations

import copy
import time

import lightning.pytorch as pl
import torch

from benchmarks import Table, interleaved_medians, quiet, test_accuracy, trainer
from lightning_compress import DistillationModule
from lightning_compress.examples.models import TextClassifier
from lightning_compress.examples.text import BrownGenreDataModule

TEACHER_EPOCHS, STUDENT_EPOCHS = 2, 3
TEACHER_LR, STUDENT_LR = 1e-4, 2e-4
LAYERS = [0, 2, 4]
SENTENCES_PER_DOC = 10  # as experiment=distill_minilm


def _fit(module: pl.LightningModule, dm: pl.LightningDataModule, epochs: int) -> float:
    pl.seed_everything(0)
    t0 = time.perf_counter()
    trainer(epochs, []).fit(module, dm)
    return time.perf_counter() - t0


def _speed(teacher: torch.nn.Module, student: torch.nn.Module) -> dict[str, float]:
    """Median seconds of one forward at batch 32 x 128 tokens (no padding), teacher and student interleaved."""
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 20000, (32, 128), generator=g),
              "attention_mask": torch.ones(32, 128, dtype=torch.long)}  # fmt: skip
    teacher, student = teacher.eval(), student.eval()
    with torch.inference_mode():
        return interleaved_medians({"teacher": lambda: teacher(**inputs), "student": lambda: student(**inputs)}, 5, 1)


def run() -> list[Table]:
    quiet()
    dm = BrownGenreDataModule(batch_size=32, max_sentences_per_doc=SENTENCES_PER_DOC)
    pl.seed_everything(0)
    teacher = TextClassifier("all-MiniLM-L6-v2", num_labels=2, lr=TEACHER_LR)
    t_teacher = _fit(teacher, dm, TEACHER_EPOCHS)
    teacher_acc = test_accuracy(teacher, dm)
    rows, students = [], {}
    for name, kwargs in (
        ("distilled (T=4, α=0.5, hidden cosine)", dict(temperature=4.0, alpha=0.5, hidden_loss="cosine")),
        ("distilled (T=4, α=0.5, logits only)", dict(temperature=4.0, alpha=0.5)),
        ("hard labels only (α=0)", dict(alpha=0.0)),
    ):
        module = DistillationModule(None, teacher, student_layers=LAYERS, lr=STUDENT_LR, **kwargs)
        seconds = _fit(module, dm, STUDENT_EPOCHS)
        acc = test_accuracy(module, dm)
        students[name] = module.student
        rows.append([name, f"{100 * acc:.2f}%", f"{100 * acc / teacher_acc:.1f}%", f"{seconds:.0f} s"])
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in students[rows[0][0]].parameters())
    speed = _speed(copy.deepcopy(teacher.net), copy.deepcopy(students[rows[0][0]].net))
    accuracy = Table(
        "Distillation: all-MiniLM-L6-v2 teacher -> 3-layer student, Brown sentences informative vs imaginative",
        ["model", "test acc", "% of teacher (target ≥ 97%)", "train time"],
        [["teacher (6 layers, fine-tuned)", f"{100 * teacher_acc:.2f}%", "100%", f"{t_teacher:.0f} s"], *rows],
        [
            f"Documents split 70/15/15 by genre group, {SENTENCES_PER_DOC} sentences each; train balanced 1:1, test "
            f"75 documents (75% informative sentences: the majority baseline is 74.7%). Teacher {TEACHER_EPOCHS} "
            f"epochs at lr {TEACHER_LR:g}; every student {STUDENT_EPOCHS} epochs at lr {STUDENT_LR:g}, initialised "
            f"from teacher layers {LAYERS} (same init, same seed, same data order).",
        ],
    )
    size = Table(
        "Distilled student: size and CPU inference (batch 32 × 128 tokens, median of interleaved forwards)",
        ["model", "parameters", "forward", "speed-up (target ≥ 1.6×)"],
        [
            ["teacher", f"{n_t:,}", f"{1000 * speed['teacher']:.0f} ms", "1.00×"],
            [
                "student",
                f"{n_s:,} ({n_s / n_t:.2f}×)",
                f"{1000 * speed['student']:.0f} ms",
                f"{speed['teacher'] / speed['student']:.2f}×",
            ],
        ],  # fmt: skip
        ["The embeddings (12.3 M of MiniLM's 22.7 M parameters) stay whole; the encoder halves."],
    )
    return [accuracy, size]
