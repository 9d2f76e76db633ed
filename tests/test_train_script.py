"""The main job end to end, as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_compress.examples.models import ImageClassifier, SmallCNN

ROOT = Path(__file__).resolve().parents[1]


def run_train(tmp_path, *overrides):
    cmd = [sys.executable, "scripts/train.py", f"hydra.run.dir={tmp_path}", "trainer.enable_progress_bar=false"]
    return subprocess.run(cmd + list(overrides), cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_main_job_trains_reports_and_checkpoints(tmp_path):
    proc = run_train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = float(next(ln for ln in proc.stdout.splitlines() if ln.startswith("test/acc:")).split(":")[1])
    assert acc >= 0.95
    assert "| **total** |" in proc.stdout
    summary = (tmp_path / "report.md").read_text()
    assert "| net.6 | Linear | 64×512 | 32,832 |" in summary
    plots = [line[line.index("(") + 1 : -1] for line in summary.splitlines() if line.startswith("![")]
    assert len(plots) >= 3 and all((tmp_path / p).read_bytes().startswith(b"\x89PNG") for p in plots)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    ImageClassifier(SmallCNN()).load_state_dict(ckpt["state_dict"], strict=True)


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tmp_path):
    first = run_train(tmp_path / "a", "trainer.max_epochs=2", "test=false")
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    second = run_train(tmp_path / "b", "trainer.max_epochs=3", "test=false", f"ckpt_path={last}")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["global_step"] == 3 * torch.load(last, weights_only=True)["global_step"] // 2


def test_unknown_recipe_fails_with_a_clear_message(tmp_path):
    proc = run_train(tmp_path, "+compress=nonexistent")
    assert proc.returncode != 0
    assert "Could not find 'compress/nonexistent'" in proc.stderr + proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["gptq_int4", "smoothquant_w8a8"])
def test_post_training_recipes_run_at_fit_end(tmp_path, recipe):
    proc = run_train(tmp_path, f"+compress={recipe}", "trainer.max_epochs=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = float(next(ln for ln in proc.stdout.splitlines() if ln.startswith("test/acc:")).split(":")[1])
    assert acc >= 0.85  # the quantized model is what Trainer.test evaluates
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| net.")]
    quantized = [r for r in rows if "FakeQuant" in r]
    bits = "4" if recipe == "gptq_int4" else "8"
    assert len(quantized) == (4 if recipe == "gptq_int4" else 2)  # GPTQ: convs and Linears; SmoothQuant: Linears
    assert all(r.split("|")[7].strip() == bits for r in quantized)


@pytest.mark.slow
def test_distill_minilm_experiment_runs_end_to_end(tmp_path):
    proc = run_train(tmp_path, "experiment=distill_minilm", "data.max_sentences_per_doc=3", "teacher.max_epochs=1",
                     "trainer.max_epochs=1", "model.lr=3e-4", "distillation.lr=3e-4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    teacher = float(next(ln for ln in lines if ln.startswith("teacher test/acc:")).split(":")[1])
    student = float(next(ln for ln in lines if ln.startswith("test/acc:")).split(":")[1])
    assert teacher > 0.6 and student > 0.6  # a smoke run (3 sentences per document, 1 epoch each): it learns something
    assert "| student.net.bert.encoder.layer.2.output.dense | Linear |" in proc.stdout  # 3 blocks: 0, 1, 2
    assert "student.net.bert.encoder.layer.3." not in proc.stdout
    assert (tmp_path / "teacher.ckpt").is_file()
    from lightning_compress.distillation import student_from_teacher
    from lightning_compress.examples.models import TextClassifier

    student_model = student_from_teacher(TextClassifier("all-MiniLM-L6-v2", num_labels=2), [0, 2, 4])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    student_model.load_state_dict(ckpt["state_dict"], strict=True)  # the checkpoint is the student alone


@pytest.mark.slow
def test_qat_smollm2_experiment_runs_end_to_end_and_reports_perplexity_before_and_after(tmp_path):
    proc = run_train(tmp_path, "experiment=qat_smollm2", "trainer.max_steps=1", "trainer.limit_val_batches=1",
                     "trainer.val_check_interval=2", "data.train_sequences=8", "data.val_sequences=1",
                     "data.test_sequences=2", "callbacks.qat.init_from.num_batches=1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    before = float(next(ln for ln in lines if ln.startswith("teacher test/perplexity:")).split(":")[1])
    after = float(next(ln for ln in lines if ln.startswith("test/perplexity:")).split(":")[1])
    assert 1 < before < after < 10 * before  # int4 after one step: worse than FP32, not broken
    quantized = [ln for ln in lines if ln.startswith("| student.model.model.layers.") and "FakeQuantLinear" in ln]
    assert len(quantized) == 210 and all(r.split("|")[7].strip() == "4" for r in quantized)
    assert "| student.model.lm_head | Linear |" in proc.stdout  # the tied output embeddings stay FP32
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
