"""One-shot LLM compression on SmolLM2-135M-Instruct: ours side by side with llm-compressor on the same data.

Calibration: ``CALIBRATION`` windows of ``SEQ_LEN`` tokens of the even Brown documents; perplexity: ``EVALUATION``
windows of the odd ones (token-weighted, :func:`lightning_compress.evaluation.perplexity`). Each of our rows runs in
its own subprocess (a fresh model; its wall time and peak RSS are its own); the peer's rows run in llm-compressor's
own venv (``benchmarks/peers``), on the very same token windows, saved to one file both read.

SmolLM2's weights were stored as Q4_1 (asymmetric 4-bit, groups of 32): 4-bit group-32 rounding is nearly lossless on
it, so the rows are per channel at 4 and 3 bits, groups of 64, and pruning at 50% and 2:4.

``LLM_BENCH_ONLY=name,name`` runs only the named rows or tables (the section keeps the other tables already in
RESULTS.md, each with its own date); ``LLM_BENCH_PEER=0`` skips the peer.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import Table, machine

CALIBRATION, EVALUATION, SEQ_LEN, BATCH = 64, 32, 256, 8
SEED = 0
TIMEOUT_S = 3600

# (row name, our recipe: callbacks as (class name, kwargs), peer config or None). 4-bit per channel first.
SCHEMES = {
    "W4 per channel": {"bits": 4, "group_size": None},
    "W3 per channel": {"bits": 3, "group_size": None},
    "W4 group 64": {"bits": 4, "group_size": 64},
}
ASYM = {"symmetric": False}


def _rows() -> list[tuple[str, str, list[tuple[str, dict]], dict | None]]:
    """``(table, method, our callbacks, peer config)`` for every row, one table's rows together: 4-bit per channel
    (the targets), pruning, then 3-bit per channel and groups of 64."""
    pruning = []
    for pattern, sparsity, label in ((None, 0.5, "50%"), ("2:4", None, "2:4")):
        prune = {"pattern": pattern} if pattern else {"sparsity": sparsity}
        peer = {"sparsity": 0.5, "mask_structure": pattern or "0:0"}
        pruning += [
            ("pruning", f"magnitude {label}", [("magnitude", prune)], {"method": "magnitude", **peer}),
            ("pruning", f"Wanda {label}", [("WandaPrune", prune)], {"method": "wanda", **peer}),
            ("pruning", f"SparseGPT {label}", [("SparseGPTPrune", prune)], {"method": "sparsegpt", **peer}),
        ]
    # 2:4 + W4 per channel. The peer's one route is SparseGPT, then GPTQ (its example): beside our one pass with its
    # plain grid, and beside our SparseGPT then GPTQFinalize's defaults with the same act-order + mse observer
    joint = {"method": "sparsegpt", "sparsity": 0.5, "mask_structure": "2:4", "bits": 4, "group_size": None,
             "symmetric": False}  # fmt: skip
    pruning += [
        ("pruning", "SparseGPT 2:4 + W4 per channel (ours: one pass)",
         [("SparseGPTPrune", {"pattern": "2:4", "bits": 4, "symmetric": False})], joint),
        ("pruning", "SparseGPT 2:4, then GPTQ act-order + clip search = GPTQFinalize(bits=4) default",
         [("SparseGPTPrune", {"pattern": "2:4"}), ("GPTQFinalize", {"bits": 4})],
         {**joint, "act_order": "static", "observer": "mse"}),
    ]  # fmt: skip
    rows = []
    for table, scheme in SCHEMES.items():
        grid = {**scheme, **ASYM}
        peer = {"bits": scheme["bits"], "group_size": scheme["group_size"], "symmetric": False}
        gptq = {**grid, "act_order": False, "clip_search": False}
        ordered = {**grid, "act_order": True, "static_groups": True, "clip_search": False}
        clipped = {**ordered, "clip_search": True}
        default = table == "W4 per channel"  # there the clip-search row is the bare GPTQFinalize(bits=4)
        static, mse = {"act_order": "static"}, {"act_order": "static", "observer": "mse"}
        rows += [
            (table, "RTN", [("rtn", grid)], {"method": "rtn", **peer}),
            (table, "GPTQ", [("GPTQFinalize", gptq)], {"method": "gptq", "act_order": None, **peer}),
            (table, "GPTQ act-order", [("GPTQFinalize", ordered)], {"method": "gptq", **static, **peer}),
            (table, "GPTQ act-order + clip search" + (" = GPTQFinalize(bits=4) default" if default else ""),
             [("GPTQFinalize", {"bits": 4} if default else clipped)], {"method": "gptq", **mse, **peer}),
            (table, "AWQ", [("AWQCalibrate", grid)], {"method": "awq", **peer}),
            (table, "AWQ + GPTQ act-order + clip search",
             [("AWQCalibrate", {**grid, "quantize": False}), ("GPTQFinalize", clipped)],
             {"method": "awq_gptq", **mse, **peer}),
        ]  # fmt: skip
        if default:
            rows += pruning
    return rows


def _data_file(folder: Path) -> Path:
    """The calibration and evaluation token windows (and where the model is), saved once for both sides."""
    from lightning_compress.examples.brown import split_documents
    from lightning_compress.examples.pretrained import SMOLLM2_GGUF, load_tokenizer, smollm2_path
    from lightning_compress.examples.text import token_sequences

    tokenizer = load_tokenizer("smollm2")
    calib, held_out = split_documents(SEED)
    windows = [torch.cat([b["input_ids"] for b in token_sequences(tokenizer, docs, SEQ_LEN, BATCH, n)])
               for docs, n in ((calib, CALIBRATION), (held_out, EVALUATION))]  # fmt: skip
    path = folder / "llm_data.pt"
    torch.save({"calibration": windows[0], "evaluation": windows[1], "model_folder": smollm2_path(),
                "gguf_file": SMOLLM2_GGUF}, path)  # fmt: skip
    return path


def _batches(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids[i : i + BATCH], "attention_mask": torch.ones_like(ids[i : i + BATCH])}
            for i in range(0, len(ids), BATCH)]  # fmt: skip


def run_ours(data_file: str, callbacks: list[tuple[str, dict]]) -> dict[str, Any]:
    """One of our rows, in this process: load SmolLM2, compress one-shot, perplexity; wall time of the compression
    only, peak RSS through the compression (``oneshot_rss_mb``) and of the whole process (``peak_rss_mb``)."""
    import lightning_compress
    from lightning_compress.evaluation import perplexity
    from lightning_compress.examples.pretrained import load_pretrained
    from lightning_compress.functional.awq import fake_quant_weight
    from lightning_compress.functional.masks import magnitude_mask, nm_mask
    from lightning_compress.nn.select import select_layers

    data = torch.load(data_file)
    model, _ = load_pretrained("smollm2", task="causal_lm")
    model.eval()
    calib, held_out = _batches(data["calibration"]), _batches(data["evaluation"])
    start = time.perf_counter()
    for name, kwargs in callbacks:
        if name == "rtn":  # round to nearest on each layer's min-max grid
            with torch.no_grad():
                for layer in select_layers(model).values():
                    layer.weight.copy_(fake_quant_weight(layer.weight, kwargs["bits"], kwargs["group_size"],
                                                         kwargs["symmetric"]))  # fmt: skip
        elif name == "magnitude":  # one-shot magnitude pruning per layer (what IterativePruning does in one step)
            with torch.no_grad():
                for layer in select_layers(model).values():
                    w = layer.weight
                    keep = nm_mask(w, 2, 4) if kwargs.get("pattern") else magnitude_mask(w, kwargs["sparsity"])
                    w.masked_fill_(~keep, 0.0)
        else:
            getattr(lightning_compress, name)(**kwargs).apply(model, calib)
    seconds = time.perf_counter() - start
    oneshot_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # load + compression, before evaluation
    return {"perplexity": perplexity(model, held_out), "oneshot_s": seconds, "oneshot_rss_mb": oneshot_rss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "check": sparsity_check(model)}  # fmt: skip


def sparsity_check(model: torch.nn.Module) -> dict[str, Any]:
    """The fraction of exact zeros over the decoder's Linear weights and whether every 4 consecutive inputs hold
    at most 2 non-zeros (2:4): the keys llm-compressor's side reports too."""
    from lightning_compress.nn.select import select_layers

    weights = [layer.weight.detach() for layer in select_layers(model).values()]
    zeros, numel = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    two_four = all(bool(((w.reshape(-1, 4) != 0).sum(1) <= 2).all()) for w in weights)
    return {"sparsity": round(zeros / numel, 4), "two_four": two_four}


def _subprocess(args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``args``; its last stdout line is a JSON result (or an error row)."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]}
    return json.loads(lines[-1])


def _fmt(result: dict[str, Any] | None, fp32: float, two_four: bool = False) -> list[str]:
    """The four cells of one side; a ``two_four`` row whose weights are no longer 2:4 says so, with its sparsity."""
    if result is None or result.get("offered") is False:  # not offered one-shot (the peer's magnitude: its notes)
        return ["not offered", "", "", ""]
    if "error" in result:
        return [f"failed: {result['error']}", "", "", ""]
    ppl, check = result["perplexity"], result.get("check", {})
    lost = f" (not 2:4: {check['sparsity']:.0%} zeros)" if two_four and check.get("two_four") is False else ""
    return [f"{ppl:.2f}{lost}", f"{ppl / fp32:.3f}", f"{result['oneshot_s']:.0f}", f"{result['oneshot_rss_mb']:.0f}"]


def partial() -> str | None:
    """How this run was narrowed to some rows (``LLM_BENCH_ONLY=...``), or None for all of them."""
    only = os.environ.get("LLM_BENCH_ONLY", "").strip()
    return f'LLM_BENCH_ONLY="{only}"' if only else None


def _notes(peer_version: str | None) -> list[str]:
    return [
        f"Measured {datetime.date.today().isoformat()} on {machine()}.",
        f"Calibration: {CALIBRATION} windows × {SEQ_LEN} tokens of the even Brown documents; perplexity on "
        f"{EVALUATION} windows × {SEQ_LEN} of the odd ones (disjoint), the same token windows for both sides.",
        "SmolLM2's weights were stored as Q4_1 (asymmetric 4-bit, groups of 32): 4-bit group-32 rounding would be "
        "nearly lossless and prove nothing, so the schemes are per channel (4 and 3 bits) and groups of 64.",
        "All quantizer rows are asymmetric (as llm-compressor's and the reference GPTQ's); embeddings and the tied "
        "lm_head stay float. One-shot s: the compression call only (model load and perplexity excluded); one-shot "
        "RSS: the process's peak RSS through model load and compression (the perplexity run after it, ~1 GB of "
        "logits, excluded). llm-compressor "
        f"{peer_version or '(not run)'}, in its own venv on the same torch.",
        "AWQ + GPTQ: ours is AWQCalibrate(quantize=False) (AWQ's scales; its clipping is then off by default) and "
        "GPTQFinalize with its clipping search; llm-compressor's is AWQModifier then GPTQModifier with the mse "
        "observer. SparseGPT 2:4 + W4: llm-compressor's route is SparseGPTModifier then GPTQModifier (its own "
        "example), beside our one pass (SparseGPTPrune(bits=4): pruned and quantized in one column loop) and our "
        "SparseGPTPrune then GPTQFinalize (which keeps every zero). A 2:4 row whose weights no longer hold 2:4 "
        "afterwards says so, with the zeros left (both sides checked alike).",
    ]


def run() -> Iterator[Table]:
    """The tables, each yielded once its rows are measured (``benchmarks`` writes it then): 4-bit per channel,
    pruning, 3-bit per channel, 4-bit groups of 64; ours and the peer's side by side, row by row."""
    only = {s.strip() for s in os.environ.get("LLM_BENCH_ONLY", "").split(",") if s.strip()}
    with_peer = os.environ.get("LLM_BENCH_PEER", "1") != "0"
    with tempfile.TemporaryDirectory() as tmp:
        data_file = _data_file(Path(tmp))
        data = torch.load(data_file)
        from lightning_compress.evaluation import perplexity
        from lightning_compress.examples.pretrained import load_pretrained

        model, _ = load_pretrained("smollm2", task="causal_lm")
        fp32 = perplexity(model.eval(), _batches(data["evaluation"]))
        del model
        peer_version, peer_error = None, None
        if with_peer:
            from benchmarks.peers import peer_python, run_peer

            try:
                peer_python()
            except RuntimeError as err:
                peer_error = f"peer venv not available: {str(err).splitlines()[0][:120]}"
        headers = ["method", "ours: perplexity", "× FP32", "one-shot s", "one-shot RSS MB",
                   "llm-compressor: perplexity", "× FP32", "one-shot s", "one-shot RSS MB"]  # fmt: skip
        current: Table | None = None
        for table, method, callbacks, peer_cfg in _rows():
            if only and method not in only and table not in only:
                continue
            title = f"SmolLM2-135M, {table}: held-out Brown perplexity"
            if current is None or current.title != title:
                if current is not None:
                    current.notes = _notes(peer_version)
                    yield current
                first = ["FP32", f"{fp32:.2f}", "1.000", "", "", f"{fp32:.2f}", "1.000", "", ""]
                current = Table(title, headers, [first])
            print(f"[llm] {table} / {method} ...", flush=True)
            ours = _subprocess([sys.executable, "-m", "benchmarks.llm", str(data_file), json.dumps(callbacks)],
                               TIMEOUT_S)  # fmt: skip
            peer = None
            if peer_cfg is not None and with_peer:
                peer = {"error": peer_error} if peer_error else run_peer(peer_cfg, data_file, TIMEOUT_S)
                peer_version = peer.get("llmcompressor", peer_version)
            two_four = "2:4" in method
            current.rows.append([method, *_fmt(ours, fp32, two_four), *_fmt(peer, fp32, two_four)])
            print(f"[llm]   {current.rows[-1]}", flush=True)
        if current is not None:
            current.notes = _notes(peer_version)
            yield current


if __name__ == "__main__":  # one of our rows, in a fresh process: python -m benchmarks.llm DATA CALLBACKS_JSON
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    result = run_ours(sys.argv[1], [tuple(c) for c in json.loads(sys.argv[2])])
    print(json.dumps(result), flush=True)
