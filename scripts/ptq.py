"""One-shot post-training quantization of a pretrained Hugging Face model with the recipes of conf/compress/.

python scripts/ptq.py +compress=gptq_int4              # GPTQ int4 on all-MiniLM-L6-v2, Brown corpus calibration
python scripts/ptq.py +compress=[smoothquant_w8a8]     # SmoothQuant W8A8
python scripts/ptq.py +compress=gptq_int3 pretrained=bert-base-uncased
python scripts/ptq.py lm=smollm2 +compress=gptq_int4     # a causal LM: SmolLM2-135M, held-out perplexity
python scripts/ptq.py lm=smollm2 +compress=auto budget=160MB   # each layer its own format, the model within 160 MB
python scripts/ptq.py task=causal_lm pretrained=PATH_OR_HUB_NAME +compress=gptq_int4
python scripts/ptq.py lm=smollm2 +compress=gptq_int4 save=compressed-tensors   # + a folder vLLM / transformers load
python scripts/ptq.py lm=smollm2 +compress=gptq_gguf save=gguf   # + model.gguf for llama.cpp / Ollama
python scripts/ptq.py task=causal_lm +compress=gptq_int4 pretrained=DIR calibration.streamed=true checkpoint_dir=CK
    # a model bigger than memory: block by block from DIR's safetensors; re-running after a crash resumes from CK

Writes the compression summary, the quality on held-out Brown text (an encoder's embedding cosine to FP32 on
sentences; a causal LM's perplexity, before and after, on ``seq_len``-token windows of other documents), and the int
tensors each callback produced (``quantized.safetensors``: ``<layer>/weight.codes``, ``<layer>/weight.scale``, ...)
into the run directory; with ``save=compressed-tensors`` or ``save=gguf`` also what serving stacks load
(``<run dir>/<format>/``). With ``calibration.streamed=true`` the model is never loaded whole
(:func:`~lightning_compress.streaming.calibrate_streamed`): the result is ``<run dir>/compressed-tensors/`` only, and
no quality is measured (that would need the whole model).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors.torch import save_file

from lightning_compress.callbacks.auto import AutoCompress
from lightning_compress.callbacks.report import stage_of, weight_snapshots, write_report
from lightning_compress.evaluation import perplexity
from lightning_compress.examples.brown import read_brown, split_documents
from lightning_compress.examples.pretrained import load_pretrained, load_tokenizer, mean_pool, resolve_pretrained
from lightning_compress.examples.text import token_sequences, tokenize_batches
from lightning_compress.export.serving import check_serving_format, save_for_serving
from lightning_compress.summary import compression_summary

TASKS = ("base", "causal_lm")


def split_sentences(calibration: int, evaluation: int, seed: int) -> tuple[list[str], list[str]]:
    """Calibration and held-out sentences from disjoint Brown documents (even / odd files), shuffled with ``seed``."""
    docs = read_brown()
    rng = torch.Generator().manual_seed(seed)
    parts = []
    for half, n in ((docs[0::2], calibration), (docs[1::2], evaluation)):
        sentences = [s for d in half for s in d.sentences if len(s.split()) >= 5]
        parts.append([sentences[i] for i in torch.randperm(len(sentences), generator=rng)[:n].tolist()])
    return parts[0], parts[1]


def data(cfg: DictConfig, tokenizer: object) -> tuple[list[dict], list[dict]]:
    """Calibration and evaluation batches: sentences for an encoder, ``seq_len``-token windows for a causal LM."""
    c = cfg.calibration
    if cfg.task == "causal_lm":
        calib, held_out = split_documents(cfg.seed)
        return (
            token_sequences(tokenizer, calib, c.seq_len, c.batch_size, c.sequences),
            token_sequences(tokenizer, held_out, c.seq_len, c.batch_size, cfg.evaluation.sequences),
        )
    calib, held_out = split_sentences(c.sentences, cfg.evaluation.sentences, cfg.seed)
    return (
        tokenize_batches(tokenizer, calib, c.batch_size, c.max_length),
        tokenize_batches(tokenizer, held_out, c.batch_size, c.max_length),
    )


@torch.no_grad()
def embedding_cosine(model: torch.nn.Module, reference: torch.nn.Module, batches: list[dict]) -> float:
    """Mean cosine similarity between the two models' mean-pooled sentence embeddings."""
    cos = [
        torch.nn.functional.cosine_similarity(
            mean_pool(model(**b).last_hidden_state, b["attention_mask"]),
            mean_pool(reference(**b).last_hidden_state, b["attention_mask"]),
        )
        for b in batches
    ]
    return float(torch.cat(cos).mean())


@hydra.main(version_base="1.3", config_path="../conf", config_name="ptq")
def main(cfg: DictConfig) -> dict[str, float]:
    """Quantize, evaluate, write the summary and the int tensors; returns the metrics."""
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    if not callbacks or not all(hasattr(c, "apply") for c in callbacks):
        raise ValueError(
            "scripts/ptq.py needs post-training recipes (+compress=gptq_int4, gptq_int3, smoothquant_w8a8, "
            f"wanda_24, sparsegpt_50, sparsegpt_24, auto); got {[type(c).__name__ for c in callbacks]}"
        )
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not supported; allowed: {list(TASKS)}")
    check_serving_format(cfg.save)
    if cfg.calibration.get("streamed", False):
        return streamed(cfg, callbacks)
    if cfg.get("checkpoint_dir") is not None:
        raise ValueError(
            f"checkpoint_dir={cfg.checkpoint_dir!r} needs calibration.streamed=true (in-memory runs keep no checkpoint)"
        )
    model, tokenizer = load_pretrained(cfg.pretrained, task=cfg.task)
    batches, eval_batches = data(cfg, tokenizer)
    fp32 = copy.deepcopy(model)
    snapshots = weight_snapshots(model)
    start = time.perf_counter()
    tensors = {}
    for callback in callbacks:
        callback.apply(model, batches)
        for layer, mask in getattr(callback, "masks", {}).items():  # the one-shot pruners' keep-masks
            tensors[f"{layer}/mask"] = mask
        for layer, quantized in callback.quantized.items():  # codes, scales, zero-points
            tensors.update({f"{layer}/{k}": v for k, v in quantized.tensors().items()})
    metrics = {"seconds": time.perf_counter() - start}
    if cfg.task == "causal_lm":
        metrics |= {"perplexity_fp32": perplexity(fp32, eval_batches), "perplexity": perplexity(model, eval_batches)}
        monitor, before, after = "held-out perplexity", metrics["perplexity_fp32"], metrics["perplexity"]
    else:
        metrics["embedding_cosine"] = embedding_cosine(model, fp32, eval_batches)
        monitor, before, after = "embedding cosine to FP32", 1.0, metrics["embedding_cosine"]
    out = Path(HydraConfig.get().runtime.output_dir)
    summary = compression_summary(model).to_markdown()
    stages = [stage_of(fp32, "FP32", before), stage_of(model, "quantized", after)]
    auto = next((c for c in callbacks if isinstance(c, AutoCompress)), None)
    if auto is not None:  # the plan's prediction against the loss measured on the calibration batches
        metrics |= {"predicted_loss_increase": auto.plan.predicted_loss, "measured_loss_increase":
                    auto.measured_loss_increase, "plan_bytes": auto.plan.total_bytes}  # fmt: skip
        if cfg.task == "causal_lm":
            metrics["held_out_log_perplexity_ratio"] = math.log(after / before)
    write_report(model, out, stages, monitor=monitor, snapshots=snapshots,
                 plan=None if auto is None else auto.plan,
                 measured_loss_increase=None if auto is None else auto.measured_loss_increase)  # fmt: skip
    save_file(tensors, str(out / "quantized.safetensors"))
    if cfg.save is not None:
        written = save_for_serving(model, cfg.save, out / cfg.save, tokenizer, cfg.gguf_tokenizer_pre)
        print(f"{cfg.save} checkpoint: {written}")
    print(summary)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    print(f"written to {out}")
    return metrics


def streamed(cfg: DictConfig, callbacks: list) -> dict[str, float]:
    """``calibration.streamed=true``: calibrate block by block from ``pretrained``'s safetensors, resumable from
    ``checkpoint_dir``; writes ``<run dir>/compressed-tensors/``."""
    from lightning_compress.streaming import calibrate_streamed

    if len(callbacks) != 1:
        raise ValueError(
            f"calibration.streamed=true runs one recipe, got {[type(c).__name__ for c in callbacks]}; allowed: one "
            "post-training callback (e.g. +compress=gptq_int4)"
        )
    if cfg.save not in (None, "compressed-tensors"):
        raise ValueError(f"calibration.streamed=true writes compressed-tensors; save={cfg.save!r} is not allowed")
    path, extra = resolve_pretrained(cfg.pretrained)
    if extra or not Path(path).is_dir():
        raise ValueError(
            f"calibration.streamed=true needs pretrained= a local folder of safetensors shards, got {cfg.pretrained!r} "
            f"({'a GGUF file' if extra else 'not a folder'}); save the model with save_pretrained first"
        )
    tokenizer = load_tokenizer(path)
    batches, _ = data(cfg, tokenizer)
    out = Path(HydraConfig.get().runtime.output_dir)
    start = time.perf_counter()
    written = calibrate_streamed(callbacks[0], path, batches, out / "compressed-tensors", cfg.get("checkpoint_dir"),
                                 cfg.task)  # fmt: skip
    metrics = {"seconds": time.perf_counter() - start}
    print(f"compressed-tensors checkpoint: {written}")
    print(f"seconds: {metrics['seconds']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
