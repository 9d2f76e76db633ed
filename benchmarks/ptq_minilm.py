"""Post-training quantization on real weights and real text: pretrained all-MiniLM-L6-v2 on the Brown corpus.

The Brown corpus's 500 documents are split in two halves (seeded); 512 calibration sentences come from one half,
the held-out sentences from the other, so no document feeds both. Every quantized model starts from a fresh copy
of the FP32 model.

1. Layer-wise output error of every encoder Linear, GPTQ against round-to-nearest (RTN): each layer sees its FP32
   inputs (hooks on the FP32 model), the Hessian comes from the calibration tokens, the error is measured on the
   held-out tokens; 4 and 3 bits, per channel and groups of 64, GPTQ with and without ``act_order``.
2. Sentence-embedding cosine similarity to FP32 on the held-out sentences, whole model quantized: RTN and
   ``GPTQFinalize`` (true-sequential; also ``act_order`` at 4 bits per channel, the ``gptq_int4`` recipe) at 4 and
   3 bits, and ``SmoothQuantCalibrate`` W8A8 (alpha 0.5 and 0.75) against naive W8A8, per-token and per-tensor.
3. One-shot wall time of each ``GPTQFinalize(...).apply`` and ``SmoothQuantCalibrate(...).apply`` of table 2.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from benchmarks import Table, quiet
from lightning_compress import GPTQFinalize, SmoothQuantCalibrate
from lightning_compress.calibration.threads import gptq_threads
from lightning_compress.examples.brown import read_brown
from lightning_compress.examples.pretrained import load_pretrained, mean_pool
from lightning_compress.examples.text import tokenize_batches
from lightning_compress.functional.gptq import GPTQOptions, gptq_quantize, hessian_update
from lightning_compress.functional.quant import compute_qparams, fake_quantize

CALIB_SENTENCES = 512
EVAL_SENTENCES = 256
BATCH_SIZE = 32
MIN_WORDS = 5
SEED = 0
LAYER_KINDS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
NUM_LAYERS = 6
EXPLICIT_LAYER = "encoder.layer.0.intermediate.dense"
REFERENCE = (0.58, 0.53)  # (plain, act_order): IST-DASLab gptq.py on EXPLICIT_LAYER, 4-bit per channel: GPTQ / RTN
TARGET_RATIO = 0.6  # GPTQ 4-bit per channel <= 0.6x RTN
TARGET_SMOOTHQUANT = 0.99  # SmoothQuant W8A8 mean cosine >= 0.99
ALPHAS = (0.5, 0.75)  # SmoothQuant migration strengths: the paper's default, and its choice for some models
CONFIGS = [(4, None), (4, 64), (3, None), (3, 64)]  # (bits, group_size)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Batch = dict[str, Tensor]


def split_sentences(n_calib: int, n_eval: int, seed: int = SEED) -> tuple[list[str], list[str]]:
    """Calibration and held-out Brown sentences (>= MIN_WORDS words) from disjoint halves of the documents."""
    docs = read_brown()
    order = random.Random(seed).sample(range(len(docs)), len(docs))
    half = len(docs) // 2

    def pool(ids: Sequence[int]) -> list[str]:
        return [s for i in ids for s in docs[i].sentences if len(s.split()) >= MIN_WORDS]

    rng = random.Random(seed)
    return rng.sample(pool(order[:half]), n_calib), rng.sample(pool(order[half:]), n_eval)


def batches_by_length(tokenizer: PreTrainedTokenizerBase, sentences: list[str]) -> list[Batch]:
    """Tokenized batches of ``sentences`` sorted by token count: little padding, so forward passes are cheap."""
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=128)["input_ids"]]
    ordered = [s for _, s in sorted(zip(lengths, sentences, strict=True), key=lambda p: p[0])]
    return tokenize_batches(tokenizer, ordered, BATCH_SIZE, max_length=128)


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The 36 Linears of the encoder blocks, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")}


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict[str, nn.Linear], batches: list[Batch]) -> dict[str, Tensor]:
    """``2 XᵀX`` (float64) of each layer's FP32 inputs over the non-padding tokens of ``batches``."""
    grams: dict[str, Tensor] = {}
    mask: list[Tensor] = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def add(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            grams[name] = hessian_update(grams.get(name), args[0][mask[0]])

        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].bool()]
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return grams


def relative_error(weight: Tensor, quantized: Tensor, gram: Tensor) -> float:
    """``‖X(W−Q)ᵀ‖²_F / ‖XWᵀ‖²_F`` from the Gram matrix ``XᵀX`` (bias cancels and is left out of both)."""
    w, d = weight.double(), (weight - quantized).double()
    return float(torch.trace(d @ gram @ d.T) / torch.trace(w @ gram @ w.T))


def rtn(weight: Tensor, bits: int, group_size: int | None) -> Tensor:
    """Round-to-nearest, symmetric min-max scales per output channel or per group of inputs."""
    qp = compute_qparams(weight, bits, axis=0 if group_size is None else None, group_size=group_size)
    return fake_quantize(weight, qp.scale, qp.zero_point, bits)


def layer_errors(
    layers: dict[str, nn.Linear], hessians: dict[str, Tensor], grams: dict[str, Tensor], bits: int, group: int | None
) -> dict[str, tuple[float, float, float]]:
    """Per layer: held-out relative error of RTN, GPTQ and GPTQ with ``act_order``."""
    out = {}
    for name, layer in layers.items():
        w, h, g = layer.weight.detach(), hessians[name], grams[name]
        out[name] = tuple(
            relative_error(w, q, g)
            for q in (
                rtn(w, bits, group),
                gptq_quantize(w, h, GPTQOptions(bits=bits, group_size=group), threads=gptq_threads).weight,
                gptq_quantize(
                    w, h, GPTQOptions(bits=bits, group_size=group, act_order=True), threads=gptq_threads
                ).weight,
            )
        )
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _ratio_cells(errors: list[tuple[float, float, float]], limits: tuple[float, float] | None = None) -> list[str]:
    """Mean RTN and GPTQ errors; GPTQ / RTN (plain, act_order), mean over layers of the per-layer ratio of squared
    errors and of norms; the target (plain, act_order) and whether each convention meets it."""
    squared = [(g / r, a / r) for r, g, a in errors]
    sq = [_mean([x[k] for x in squared]) for k in (0, 1)]
    norm = [_mean([x[k] ** 0.5 for x in squared]) for k in (0, 1)]
    cells = [f"{_mean([e[0] for e in errors]):.4f}", f"{_mean([e[1] for e in errors]):.4f}"]
    cells += [f"{sq[0]:.2f}× / {sq[1]:.2f}×", f"{norm[0]:.2f}× / {norm[1]:.2f}×"]
    if limits is None:
        return [*cells, "", ""]

    def verdict(r: list[float]) -> str:
        return "met" if r[0] <= limits[0] and r[1] <= limits[1] else "missed"

    return [*cells, f"≤ {limits[0]}× / ≤ {limits[1]}×", f"{verdict(sq)} (squared), {verdict(norm)} (norm)"]


def layerwise_table(model: nn.Module, calib: list[Batch], held_out: list[Batch]) -> Table:
    """GPTQ / RTN output-error ratio per layer kind, layer-wise on FP32 inputs."""
    layers = encoder_linears(model)
    hessians, grams = input_grams(model, layers, calib), input_grams(model, layers, held_out)
    table = Table(
        f"GPTQ vs round-to-nearest, layer-wise output error of all-MiniLM-L6-v2's Linears (Hessian from "
        f"{CALIB_SENTENCES} Brown calibration sentences, error on {EVAL_SENTENCES} held-out sentences)",
        [
            "bits",
            "weights",
            "layer",
            "RTN error",
            "GPTQ error",
            "GPTQ / RTN, squared error (plain / act_order)",
            "GPTQ / RTN, norm (plain / act_order)",
            "target (plain / act_order)",
            "met",
        ],
    )
    for bits, group in CONFIGS:
        errors = layer_errors(layers, hessians, grams, bits, group)
        weights = "per channel" if group is None else f"group {group}"
        targeted = bits == 4 and group is None
        kinds = [(k, [f"encoder.layer.{i}.{k}" for i in range(NUM_LAYERS)]) for k in LAYER_KINDS]
        for kind, names in [*kinds, ("all 36 (mean)", list(layers))]:
            limits = (TARGET_RATIO, TARGET_RATIO) if targeted else None
            table.rows.append([bits, weights, kind, *_ratio_cells([errors[n] for n in names], limits)])
        if targeted:
            table.rows.append([bits, weights, EXPLICIT_LAYER, *_ratio_cells([errors[EXPLICIT_LAYER]], REFERENCE)])
    table.notes += [
        "Error = ‖X(W−Q)ᵀ‖²_F / ‖XWᵀ‖²_F (relative squared Frobenius norm of the output change, bias excluded), X the "
        "layer's FP32 inputs at the held-out sentences' non-padding tokens; the Hessian 2XᵀX likewise from the "
        "calibration sentences' non-padding tokens. GPTQ / RTN twice: the ratio of these squared errors and the ratio "
        "of the norms ‖X(W−Q)ᵀ‖_F (its square root). Layer kinds: mean over the 6 encoder layers of the per-layer "
        "ratio; errors: mean over the layers.",
        "Symmetric min-max scales for both methods (the library's default); RTN = compute_qparams + fake_quantize; "
        "GPTQ = functional gptq_quantize, percdamp 0.01, block 128; act_order with groups forms groups in solve order.",
        f"Reference (IST-DASLab gptq.py, {CALIB_SENTENCES} calibration sentences) on {EXPLICIT_LAYER}: "
        f"{REFERENCE[0]}× RTN, {REFERENCE[1]}× with act_order, that row's targets, from a separate run (other data). "
        "On the same Hessians, a port of its solver gives exactly our ratios (asymmetric scales, checked outside this "
        "module).",
    ]
    return table


@torch.no_grad()
def embeddings(model: nn.Module, batches: list[Batch]) -> Tensor:
    """Unit-norm mean-pooled sentence embeddings ``(N, 384)``."""
    return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


@torch.no_grad()
def rtn_model(model: nn.Module, bits: int, group_size: int | None) -> nn.Module:
    """A copy of ``model`` with every Linear's weight rounded to nearest."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(rtn(module.weight, bits, group_size))
    return model


def quantized(model: nn.Module, method: Callable[[nn.Module], object]) -> tuple[nn.Module, tuple[float, float]]:
    """A copy of ``model`` quantized in place by ``method``, the seconds ``method`` took and the 1-minute load
    average right after (this CPU is often shared)."""
    model = copy.deepcopy(model)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    method(model)
    return model, (time.perf_counter() - t0, os.getloadavg()[0])


def embedding_tables(model: nn.Module, calib: list[Batch], held_out: list[Batch]) -> tuple[Table, Table]:
    """Cosine similarity of quantized-model sentence embeddings to FP32, and the one-shot wall times."""
    reference = embeddings(model, held_out)
    table = Table(
        f"Sentence-embedding cosine similarity to FP32, all-MiniLM-L6-v2, whole model quantized ({EVAL_SENTENCES} "
        f"held-out Brown sentences; calibration {CALIB_SENTENCES} sentences from other documents)",
        ["method", "weights", "activations", "mean cosine", "min cosine", "target", "met"],
    )
    seconds: dict[str, tuple[float, float]] = {}

    def row(name: str, weights: str, acts: str, q: nn.Module, target: float | None = None) -> None:
        cos = (embeddings(q, held_out) * reference).sum(dim=-1)
        met = "" if target is None else "met" if cos.mean() >= target else "missed"
        goal = "" if target is None else f"≥ {target}"
        table.rows.append([name, weights, acts, f"{cos.mean():.4f}", f"{cos.min():.4f}", goal, met])

    for bits, group in CONFIGS:
        weights = f"int{bits} " + ("per channel" if group is None else f"group {group}")
        row("RTN", weights, "FP32", rtn_model(model, bits, group))
        for act_order in (False, True) if (bits, group) == (4, None) else (False,):  # act_order: gptq_int4's recipe
            gptq = GPTQFinalize(bits=bits, group_size=group, act_order=act_order, num_batches=None)
            q, s = quantized(model, lambda m, g=gptq: g.apply(m, calib))
            name = "GPTQFinalize" + (" act_order" if act_order else "")
            seconds[f"{name} (bits={bits}{'' if group is None else f', group_size={group}'})"] = s
            row(name, weights, "FP32", q)
    for acts in ("token", "tensor"):
        label = f"int8 per {acts}" + (" (dynamic)" if acts == "token" else " (static)")
        for alpha in (None, *ALPHAS):
            sq = SmoothQuantCalibrate(alpha=alpha, act_granularity=acts, num_batches=None)
            q, s = quantized(model, lambda m, sq=sq: sq.apply(m, calib))
            name = "naive W8A8 (alpha=None)" if alpha is None else f"SmoothQuant W8A8 (alpha={alpha})"
            seconds[f"SmoothQuantCalibrate (alpha={alpha}, act_granularity={acts!r})"] = s
            row(name, "int8 per channel", label, q, None if alpha is None else TARGET_SMOOTHQUANT)
    table.notes += [
        "Embedding = mean_pool of the last hidden state (unit norm), as sentence-transformers computes it; cosine per "
        "sentence, mean and minimum over the held-out sentences.",
        "Every Linear quantized (pooler included: the default selection; it does not feed the embedding). Symmetric "
        "weights; GPTQFinalize is true-sequential, percdamp 0.01; calibration batches of 32 sentences sorted by "
        "length (little padding to compute; the library calibrates on the real tokens only).",
    ]
    return table, timing_table(model, calib, seconds)


def timing_table(model: nn.Module, calib: list[Batch], seconds: dict[str, tuple[float, float]]) -> Table:
    """One-shot wall times against one FP32 forward pass over the calibration batches."""
    t0 = time.perf_counter()
    embeddings(model, calib)
    forward, load = time.perf_counter() - t0, os.getloadavg()[0]
    table = Table(
        f"One-shot PTQ wall time on all-MiniLM-L6-v2 ({CALIB_SENTENCES} calibration sentences, "
        f"{sum(int(b['attention_mask'].sum()) for b in calib):,} tokens)",
        ["run", "seconds", "vs one FP32 forward over the calibration set", "1-min load average after"],
    )
    table.rows.append(["FP32 forward over the calibration set", f"{forward:.1f}", "1.0×", f"{load:.1f}"])
    for name, (s, load) in seconds.items():
        table.rows.append([f"{name}.apply", f"{s:.1f}", f"{s / forward:.0f}×", f"{load:.1f}"])
    table.notes.append(
        f"Measured once each (one-shot runs). The load average shows how busy the CPU was ({torch.get_num_threads()} "
        "threads here; above that, other processes shared the cores and the times are inflated)."
    )
    return table


def run() -> list[Table]:
    """All three PTQ tables."""
    quiet()
    torch.manual_seed(SEED)
    model, tokenizer = load_pretrained()
    calib_sentences, eval_sentences = split_sentences(CALIB_SENTENCES, EVAL_SENTENCES)
    calib, held_out = batches_by_length(tokenizer, calib_sentences), batches_by_length(tokenizer, eval_sentences)
    return [layerwise_table(model, calib, held_out), *embedding_tables(model, calib, held_out)]
