"""QAT and quantization-aware distillation on a causal LM: SmolLM2-135M-Instruct, GPTQ int4 / int3 per channel
refined by QAT (next-token loss) and by QAT + distillation from the FP32 model; SparseGPT 2:4 refined by distillation
with its masks held; the same fixed budget of optimizer steps for every fine-tune, perplexity on held-out Brown
text, and the step time of each against plain bf16-mixed fine-tuning."""

from __future__ import annotations

import copy
import datetime
import gc
import os
import tempfile
import time

import lightning.pytorch as pl
import torch

from benchmarks import StepTimer, Table, machine, quiet
from lightning_compress import DistillationModule, GPTQFinalize, IterativePruning, QATFakeQuant
from lightning_compress.callbacks.sparsegpt import SparseGPTPrune
from lightning_compress.evaluation import perplexity
from lightning_compress.examples.causal_lm import BrownLMDataModule, CausalLMModule
from lightning_compress.examples.pretrained import load_pretrained
from lightning_compress.functional.quant import compute_qparams, fake_quantize
from lightning_compress.nn.select import select_layers

STEPS = 32  # optimizer steps of every fine-tune
BATCH, ACCUMULATE, SEQ = 4, 2, 256  # micro-batches of 4 windows, 2 per step: 8 x 256 tokens per step
LR = 1e-4
CALIBRATION_BATCHES = 4  # 16 windows of 256 tokens for GPTQ / SparseGPT
KD = dict(temperature=1.0, alpha=0.5, teacher_dtype="bfloat16", teacher_batch_size=BATCH)


class StartPerplexity(pl.Callback):
    """The student's held-out perplexity when training starts (after the PTQ start of the callbacks before it)."""

    def __init__(self, model: torch.nn.Module, batches: list) -> None:
        self.model, self.batches, self.value = model, batches, float("nan")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.value = perplexity(self.model, self.batches)


def _trainer(callbacks: list[pl.Callback], steps: int = STEPS) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=ACCUMULATE, precision="bf16-mixed",
        limit_val_batches=0, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def _step_seconds(timer: StepTimer) -> float:
    """Median seconds per optimizer step (micro-batch times summed in pairs), the first two steps skipped."""
    steps = [sum(timer.times[i : i + ACCUMULATE]) for i in range(0, len(timer.times) - ACCUMULATE + 1, ACCUMULATE)]
    steps = steps[2:] or steps
    return sorted(steps)[len(steps) // 2]


def _fine_tune(fp: torch.nn.Module, dm: pl.LightningDataModule, test: list, callbacks: list[pl.Callback],
               distil: bool, export: bool = False) -> dict[str, object]:  # fmt: skip
    """Fine-tune a copy of ``fp`` for STEPS steps with ``callbacks`` (and distillation from an FP32 copy); returns
    the perplexity at the start (after any PTQ start) and at the end, the step time (and with ``export`` the
    :func:`_export_check` of the result)."""
    pl.seed_everything(0)
    student = CausalLMModule(model=copy.deepcopy(fp), lr=LR)
    module = DistillationModule(student, copy.deepcopy(fp), **KD) if distil else student
    start, timer = StartPerplexity(student.model, test), StepTimer()
    t0 = time.perf_counter()
    _trainer([*callbacks, start, timer]).fit(module, dm)
    seconds = time.perf_counter() - t0
    result = dict(start=start.value, end=perplexity(student.model, test), step=_step_seconds(timer), seconds=seconds)
    print(f"[qat_llm] {[type(c).__name__ for c in callbacks]} distil={distil}: {result}", flush=True)
    if export:
        result["exported"] = _export_check(student.model, test)
    del module, student
    gc.collect()  # one fine-tune's three models are gone before the next loads its own
    return result


@torch.no_grad()
def _rtn(fp: torch.nn.Module, bits: int) -> torch.nn.Module:
    """A copy of ``fp`` with every Linear but the head rounded to nearest, asymmetric per output channel."""
    model = copy.deepcopy(fp)
    for layer in select_layers(model).values():
        scale, zero = compute_qparams(layer.weight, bits, symmetric=False, axis=0)
        layer.weight.copy_(fake_quantize(layer.weight, scale, zero, bits))
    return model


def _export_check(model: torch.nn.Module, test: list) -> tuple[float, float]:
    """Perplexity of ``model`` and of its compressed-tensors checkpoint read back by transformers, and the largest
    logit difference between them on the first test batch."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lightning_compress.export.serving import save_for_serving

    with tempfile.TemporaryDirectory() as folder:
        save_for_serving(model, "compressed-tensors", folder)
        dequantize = CompressedTensorsConfig(dequantize=True)  # asymmetric pack-quantized: compressed-tensors 0.19
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=dequantize)
        loaded.eval()
        with torch.no_grad():
            diff = (model.eval()(**test[0]).logits - loaded(**test[0]).logits).abs().max().item()
        return perplexity(loaded, test), diff


def _recovered(ptq: float, tuned: float, fp32: float, fp32_tuned: float) -> str:
    return f"{100 * (ptq - tuned) / (ptq - fp32):.0f}% ({100 * (ptq - tuned) / (ptq - fp32_tuned):.0f}%)"


SPEED_STEPS, SPEED_REPEATS = 6, 2


def partial() -> str | None:
    """``QAT_LLM_ONLY=speed`` runs the interleaved step-time table alone (the accuracy table is kept)."""
    only = os.environ.get("QAT_LLM_ONLY", "").strip()
    return f'QAT_LLM_ONLY="{only}"' if only else None


def _speed(fp: torch.nn.Module, dm: pl.LightningDataModule) -> Table:
    """Median optimizer-step seconds of plain bf16-mixed fine-tuning, QAT (LSQ int4) and QAT + distillation, fits
    of SPEED_STEPS steps interleaved (A, B, C, A, B, C), the first two steps of each skipped."""
    runs = {
        "plain bf16-mixed fine-tuning": ([], False),
        "QAT (LSQ int4 per channel, 210 Linears)": ([lambda: QATFakeQuant(bits=4, symmetric=False, lsq=True)], False),
        "QAT + distillation (bf16 teacher)": ([lambda: QATFakeQuant(bits=4, symmetric=False, lsq=True)], True),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(SPEED_REPEATS):
        for name, (makers, distil) in runs.items():
            pl.seed_everything(0)
            student = CausalLMModule(model=copy.deepcopy(fp), lr=LR)
            module = DistillationModule(student, copy.deepcopy(fp), **KD) if distil else student
            timer = StepTimer()
            trainer = _trainer([*(m() for m in makers), timer], SPEED_STEPS)
            trainer.fit(module, dm)
            steps = [sum(timer.times[i : i + ACCUMULATE]) for i in range(0, len(timer.times), ACCUMULATE)]
            times[name] += steps[2:]
            del module, student, trainer
            gc.collect()
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    base = medians["plain bf16-mixed fine-tuning"]
    rows = [[name, f"{m:.2f} s", f"{m / base:.2f}×"] for name, m in medians.items()]
    return Table(
        f"SmolLM2-135M step time, 8 × {SEQ} tokens (2 micro-batches of 4), bf16-mixed, interleaved fits",
        ["run", "median step", "× plain (target QAT ≤ 1.3×)"],
        rows,
        [
            f"{SPEED_REPEATS} rounds of {SPEED_STEPS}-step fits in turn, first two steps of each fit skipped; LSQ runs "
            "as one C++ pass each way (`functional.fused.fused_lsq_fake_quantize`)."
        ],  # fmt: skip
    )


def run() -> list[Table]:
    quiet()
    fp, _ = load_pretrained("smollm2", task="causal_lm")
    dm = BrownLMDataModule(batch_size=BATCH, seq_len=SEQ)
    dm.setup()
    if partial():
        return [_speed(fp, dm)]
    test = [dm.splits["test"][i : i + 8] for i in range(0, len(dm.splits["test"]), 8)]
    test = [{k: v for k, v in b.items() if k != "labels"} for b in test]
    fp32 = perplexity(fp, test)
    plain = _fine_tune(fp, dm, test, [], distil=False)
    rows = [["FP32", "—", f"{fp32:.2f}", "—", "—"],
            [f"FP32 fine-tuned (next-token loss, {STEPS} steps)", "—", f"{plain['end']:.2f}", "—",
             f"{plain['step']:.2f} s (1.00×)"]]  # fmt: skip
    targets, exported = [], None
    for bits, target in ((4, 40), (3, 50)):
        rtn = perplexity(_rtn(fp, bits), test)
        rows.append([f"RTN int{bits}", "—", f"{rtn:.2f}", "—", "—"])
        runs = {}
        for distil in (False, True):
            gptq = GPTQFinalize(bits=bits, symmetric=False, num_batches=CALIBRATION_BATCHES)
            qat = QATFakeQuant(bits=bits, symmetric=False, lsq=True, init_from=gptq)
            runs[distil] = _fine_tune(fp, dm, test, [qat], distil, export=distil and bits == 4)
        gptq_ppl = runs[False]["start"]
        rows.append([f"GPTQ int{bits}", "—", f"{gptq_ppl:.2f}", "—", "—"])
        for distil, label in ((False, "GPTQ → QAT (LSQ, next-token loss)"), (True, "GPTQ → QAT + distillation")):
            r = runs[distil]
            step = f"{r['step']:.2f} s ({r['step'] / plain['step']:.2f}×)"
            rows.append([f"{label}, int{bits}", f"{r['start']:.2f}", f"{r['end']:.2f}",
                         _recovered(gptq_ppl, r["end"], fp32, plain["end"]), step])  # fmt: skip
        got = (gptq_ppl - runs[True]["end"]) / (gptq_ppl - fp32)
        targets.append(f"int{bits} per channel: QAT + distillation recovers {100 * got:.0f}% of GPTQ's perplexity "
                       f"loss (target ≥ {target}%): {'met' if 100 * got >= target else 'not met'}.")  # fmt: skip
        if bits == 4:
            exported = (runs[True]["end"], *runs[True]["exported"])
            overhead = runs[False]["step"] / plain["step"]
    prune = IterativePruning(init_from=SparseGPTPrune(pattern="2:4", num_batches=CALIBRATION_BATCHES))
    sparse = _fine_tune(fp, dm, test, [prune], distil=True)
    rows.append(["SparseGPT 2:4", "—", f"{sparse['start']:.2f}", "—", "—"])
    rows.append(["SparseGPT 2:4 → distillation (masks held)", f"{sparse['start']:.2f}", f"{sparse['end']:.2f}",
                 _recovered(sparse["start"], sparse["end"], fp32, plain["end"]),
                 f"{sparse['step']:.2f} s ({sparse['step'] / plain['step']:.2f}×)"])  # fmt: skip
    got = (sparse["start"] - sparse["end"]) / (sparse["start"] - fp32)
    targets.append(f"2:4 + distillation recovers {100 * got:.0f}% of SparseGPT 2:4's loss (target ≥ 50%): "
                   f"{'met' if got >= 0.5 else 'not met'}.")  # fmt: skip
    targets.append(f"QAT step (LSQ fake-quant of 210 Linears) {overhead:.2f}× plain bf16-mixed fine-tuning "
                   f"(target ≤ 1.3×): {'met' if overhead <= 1.3 else 'not met'}.")  # fmt: skip
    ppl, loaded, diff = exported
    targets.append(f"Export: the int4 QAT + distillation student written as compressed-tensors and read back by "
                   f"transformers: perplexity {loaded:.2f} vs {ppl:.2f} fine-tuned, largest logit difference "
                   f"{diff:.2e} on a test batch.")  # fmt: skip
    table = Table(
        f"SmolLM2-135M-Instruct: PTQ, then {STEPS} steps of 8 × 256 tokens of QAT / distillation (CPU, bf16-mixed)",
        ["model", "perplexity at fine-tune start", "held-out perplexity", "of the PTQ loss recovered", "step time"],
        rows,
        [
            f"Measured {datetime.date.today().isoformat()} on {machine()}.",
            f"Budget: {STEPS} AdamW steps (lr {LR:g}, 10% warmup then linear decay) of 8 windows × {SEQ} tokens "
            f"({STEPS * 8 * SEQ:,} tokens), micro-batches of {BATCH}, of the even Brown documents; perplexity on the "
            f"first 64 windows of {SEQ} tokens of the odd documents (as `scripts/ptq.py lm=smollm2`), in FP32.",
            f"GPTQ: asymmetric per output channel, act order, clipping search, {CALIBRATION_BATCHES * BATCH} "
            "training windows; QAT starts from its codes and scales (LSQ learns the scales, zero-points fixed; "
            "`QATFakeQuant(init_from=GPTQFinalize(...))`), so its start perplexity is GPTQ's. Output embeddings "
            "(tied to the input ones) stay FP32 in every row.",
            "Distillation: token-level KL at T = 1 from the FP32 model (teacher in bf16, run per micro-batch) and "
            "the next-token loss, half each (α = 0.5). 2:4: "
            "`IterativePruning(init_from=SparseGPTPrune(pattern='2:4'))` holds SparseGPT's masks while distilling.",
            "Recovered = (PTQ − tuned) / (PTQ − FP32), the issue's measure. Fine-tuning on Brown text also adapts "
            "the model to it: the FP32 model fine-tuned alone (same budget) drops too, so the stricter measure, "
            "(PTQ − tuned) / (PTQ − FP32 fine-tuned), is given in brackets.",
            "Step times: separate runs one after another (not interleaved), median optimizer step after two "
            "warm-up steps; QAT + distillation adds the bf16 teacher's forward.",
        ],
    )
    return [table, Table("Targets", ["target"], [[t] for t in targets]), _speed(fp, dm)]
