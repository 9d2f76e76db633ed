"""One llm-compressor one-shot run on SmolLM2 (CPU, float32), then perplexity; prints one JSON line last on stdout.

Standalone: runs inside the peer venv that ``benchmarks.peers.peer_python()`` builds, and imports nothing of
lightning_compress. By hand::

    .venv-peers/llmcompressor/bin/python benchmarks/peers/llmcompressor_run.py \\
        --config '{"method": "gptq", "bits": 4, "group_size": null, "symmetric": true, "act_order": null}' \\
        --data data.pt

``--data``: a ``torch.save``d dict ``{"calibration": LongTensor (N, T), "evaluation": LongTensor (M, T),
"model_folder": str, "gguf_file": str}``; every calibration token is real (attention mask all ones).

``--config`` keys: ``method`` (fp32, rtn, gptq, awq, awq_gptq, sparsegpt, wanda, magnitude), ``bits`` (4 or 3;
for sparsegpt/wanda: optional joint quantization after the pruning, by ``joint_quantizer`` "gptq" (default, as in
llm-compressor's 2:4 + W4A16 example) or "rtn"), ``group_size`` (null: per output channel), ``symmetric`` (default
true), ``act_order`` (null or "static"; GPTQ only), ``observer`` ("minmax", default, or "mse": the weights'
range searched as the reference GPTQ's ``mse`` option, maxshrink 0.8, grid 100, norm 2.4, no early stop),
``sparsity`` (0.5), ``mask_structure`` ("0:0" unstructured or
"2:4"), ``threads`` (torch threads), ``eval_batch`` (8).

``magnitude`` is not offered one-shot (see MAGNITUDE_NOTE): the result says so, without running anything, unless
``"force": true``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

DEFAULTS = {
    "bits": 4,
    "group_size": None,
    "symmetric": True,
    "act_order": None,
    "sparsity": 0.5,
    "mask_structure": "0:0",
    "eval_batch": 8,
}

QUANT_METHODS = ("rtn", "gptq", "awq", "awq_gptq")
PRUNE_METHODS = ("sparsegpt", "wanda", "magnitude")
METHODS = ("fp32", *QUANT_METHODS, *PRUNE_METHODS)

DECODER_LINEAR = re.compile(r".*layers\.\d+\..*_proj$")  # q/k/v/o and gate/up/down of every decoder layer

MAGNITUDE_NOTE = (
    "magnitude: not offered one-shot by llmcompressor 0.14.0.1: MagnitudePruningModifier only applies its masks to "
    "the weights on optimizer steps (OPTIM_POST_STEP), which oneshot never sends (run anyway: 0/210 layers changed, "
    "perplexity = fp32's), and its mask structures are unstructured/channel/filter/block_* ('2:4' is a ValueError)"
)


def load_model(folder: str, gguf_file: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # transformers dequantizes the GGUF tensors (Q4_1) to float32 at load, yet leaves a GgufConfig and its quantizer
    # on the model; oneshot() refuses models "already quantized in a different format (gguf)". The weights are plain
    # float32 tensors, so drop both marks.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # oneshot() re-reads the config from disk (AutoConfig.from_pretrained(model.config.name_or_path)) to reject
    # pre-quantized checkpoints; a GGUF folder has no config.json, so point it at a saved copy of the in-memory one.
    config_dir = tempfile.mkdtemp(prefix="smollm2-config-")
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    return model.eval(), tokenizer


def config_groups(cfg: dict) -> dict:
    """llm-compressor's ``config_groups``: one scheme, weights only, int, per channel or per group, on all Linear.

    (``scheme=`` takes only preset names such as "W4A16" in 0.14; a custom scheme goes through ``config_groups``.)
    """
    weights = {"num_bits": int(cfg["bits"]), "type": "int", "symmetric": bool(cfg["symmetric"])}
    if cfg.get("observer") == "mse":  # the reference GPTQ's clip search: grid 100, shrink to 0.2, norm 2.4, all steps
        weights.update(observer="memoryless_mse",
                       observer_kwargs={"grid": 100.0, "maxshrink": 0.8, "norm": 2.4, "patience": 1000})  # fmt: skip
    if cfg["group_size"]:
        weights.update(strategy="group", group_size=int(cfg["group_size"]))
    else:
        weights.update(strategy="channel")
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def build_recipe(cfg: dict, notes: list[str]) -> list:
    """The list of modifiers for ``cfg["method"]``; applied in order by one ``oneshot`` call."""
    from llmcompressor.modifiers.pruning import MagnitudePruningModifier, WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    method = cfg["method"]
    quant = {"ignore": ["lm_head"]}

    def gptq(**over) -> GPTQModifier:
        # actorder=None must be passed explicitly: the default (a sentinel) means "static" in llmcompressor 0.14.
        kw = {"block_size": 128, "dampening_frac": 0.01, "actorder": cfg["act_order"]}
        return GPTQModifier(**quant, config_groups=config_groups(cfg), **{**kw, **over})

    if method == "rtn":
        return [QuantizationModifier(**quant, config_groups=config_groups(cfg))]
    if method == "gptq":
        return [gptq()]
    if method == "awq":
        # In 0.14 AWQ is a transform (smoothing scales searched against the scheme of the quantization modifier that
        # follows it in the recipe); the weights are then rounded by RTN (QuantizationModifier).
        return [AWQModifier(), QuantizationModifier(**quant, config_groups=config_groups(cfg))]
    if method == "awq_gptq":
        return [AWQModifier(), gptq()]
    if method in PRUNE_METHODS:
        sparsity, mask = float(cfg["sparsity"]), str(cfg["mask_structure"])
        targets = ["re:" + DECODER_LINEAR.pattern]  # the decoder's Linear layers (never lm_head / embeddings)
        if method == "sparsegpt":
            recipe = [SparseGPTModifier(sparsity=sparsity, mask_structure=mask, targets=targets, dampening_frac=0.01)]
        elif method == "wanda":
            recipe = [WandaPruningModifier(sparsity=sparsity, mask_structure=mask, targets=targets)]
        else:
            recipe = [
                MagnitudePruningModifier(
                    targets=targets,
                    init_sparsity=sparsity,
                    final_sparsity=sparsity,
                    mask_structure="unstructured" if mask in ("0:0", "unstructured") else mask,
                    start=0,
                    end=1,
                    update=1,
                )
            ]
        if cfg["joint_bits"]:
            # As in llm-compressor's 2:4 + W4A16 example: the pruned model is then quantized by GPTQ. Its error
            # feedback also updates pruned weights, so some zeros come back (the check below measures it); "rtn"
            # (QuantizationModifier) keeps every zero of a symmetric scheme (0 rounds to 0).
            joint = cfg.get("joint_quantizer", "gptq")
            if joint == "gptq":
                recipe.append(gptq())
            elif joint == "rtn":
                recipe.append(QuantizationModifier(**quant, config_groups=config_groups(cfg)))
            else:
                raise ValueError(f"joint_quantizer {joint!r}: gptq or rtn")
            scope = f"groups of {cfg['group_size']}" if cfg["group_size"] else "per channel"
            notes.append(f"joint: {method} then {joint} W{cfg['bits']} {scope}")
        return recipe
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def cpu_patches(cfg: dict, notes: list[str]) -> None:
    """Make llm-compressor 0.14 run without CUDA; the algorithms are untouched.

    AWQ's smoothing pins its cached activations (``IntermediatesCache.pin_memory``, only there to speed up host to
    device copies); with a CUDA build of torch and no driver, ``Tensor.pin_memory()`` raises "Found no NVIDIA driver".
    Without CUDA there is nothing to copy to, so pinning becomes a no-op.
    """
    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    if cfg["method"] in ("awq", "awq_gptq"):
        notes.append("CPU patch: IntermediatesCache.pin_memory made a no-op (AWQ pins its cache, which needs CUDA)")


def calibration_loader(ids: torch.Tensor):
    """One window per batch (llm-compressor's default batch size 1); attention mask all ones."""
    from torch.utils.data import DataLoader

    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]

    def collate(batch: list[dict]) -> dict:
        return {k: torch.stack([x[k] for x in batch]) for k in batch[0]}

    return DataLoader(rows, batch_size=1, shuffle=False, collate_fn=collate)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int) -> float:
    """exp of the token-weighted mean NLL of all M × (T-1) next-token predictions (float32)."""
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        x = ids[i : i + batch]
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1].float()
        target = x[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return math.exp(total / count)


@torch.no_grad()
def effective_weight(module: torch.nn.Linear) -> torch.Tensor:
    """The weight the module's forward really applies: forward of the identity, minus the bias, transposed.

    This is how we verify that the model evaluated is the quantized one, whatever mechanism llm-compressor uses
    (weights overwritten in place by GPTQ, or fake-quantized on the fly by compressed-tensors' wrapped forward):
    ``x @ W.T`` with ``x = I`` is exactly ``W.T`` in float32 (each output is one product by 1 plus exact zeros).
    """
    eye = torch.eye(module.in_features, dtype=module.weight.dtype)
    out = module(eye)
    if getattr(module, "bias", None) is not None:
        out = out - module.bias
    return out.T.contiguous()


def check_compression(model, originals: dict[str, torch.Tensor], cfg: dict, notes: list[str]) -> dict:
    """Compare the effective weights of the decoder's Linear layers with their originals (see effective_weight)."""
    changed, stored_changed, levels_max, zeros, numel, two_four_ok = 0, 0, 0, 0, 0, True
    group = cfg["group_size"] or None
    for name, module in model.named_modules():
        if name not in originals:
            continue
        w = effective_weight(module)
        changed += not torch.equal(w, originals[name])
        stored_changed += not torch.equal(module.weight.detach(), originals[name])
        zeros += int((w == 0).sum())
        numel += w.numel()
        if cfg["method"] in QUANT_METHODS or cfg["joint_bits"]:
            rows = w.reshape(-1, group) if group else w
            # distinct values per scale group (row or group); a pruned zero may add one level
            levels_max = max(levels_max, max(len(torch.unique(r)) for r in rows[:: max(1, len(rows) // 64)]))
        if cfg["method"] in PRUNE_METHODS and cfg["mask_structure"] == "2:4":
            two_four_ok &= bool(((w.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())
    check = {
        "linear_layers": len(originals),
        "changed": changed,  # effective weights (what the forward computes with) that differ from the originals
        "stored_changed": stored_changed,  # the .weight tensors themselves
        "sparsity": round(zeros / max(numel, 1), 4),
    }
    if levels_max:
        check["max_levels_per_group"] = levels_max
    if cfg["method"] in PRUNE_METHODS and cfg["mask_structure"] == "2:4":
        check["two_four"] = two_four_ok
    if changed < len(originals):
        notes.append(f"WARNING: only {changed}/{len(originals)} Linear layers' effective weights changed")
    return check


def compress(model, tokenizer, calib: torch.Tensor, cfg: dict, result: dict):
    """Run ``oneshot`` with the method's recipe on the calibration windows; fills oneshot_s/oneshot_cpu_s/check."""
    from llmcompressor import oneshot

    notes = result["notes"]
    originals = {  # the decoder's Linear weights before oneshot, for check_compression
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and DECODER_LINEAR.match(n)
    }
    recipe = build_recipe(cfg, notes)
    cpu_patches(cfg, notes)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=calibration_loader(calib),  # a DataLoader is used as is: no shuffling, truncation or padding
        num_calibration_samples=len(calib),
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
    )
    result["oneshot_s"] = round(time.perf_counter() - start, 2)
    result["oneshot_cpu_s"] = round(time.process_time() - cpu_start, 2)  # all threads: robust to a busy machine
    model.eval()
    result["check"] = check_compression(model, originals, cfg, notes)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON object")
    parser.add_argument("--data", required=True, help="torch.save'd dict of calibration/evaluation windows")
    args = parser.parse_args()
    # llm-compressor's loguru sink and tqdm bars write to sys.stdout: send all of it to stderr, keep stdout for the
    # one JSON line
    json_out, sys.stdout = sys.stdout, sys.stderr
    given = json.loads(args.config)
    cfg = {**DEFAULTS, **given}
    cfg["joint_bits"] = cfg["method"] in PRUNE_METHODS and given.get("bits") is not None
    threads = int(cfg.get("threads") or os.environ.get("OMP_NUM_THREADS") or 2)
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    result: dict = {"method": cfg["method"], "perplexity": None, "oneshot_s": None, "notes": []}
    notes: list[str] = result["notes"]
    try:
        import llmcompressor

        result["llmcompressor"] = llmcompressor.__version__
        result["config"] = {k: v for k, v in cfg.items() if k != "threads"}
        if cfg["method"] not in METHODS:
            raise ValueError(f"unknown method {cfg['method']!r}; one of {METHODS}")
        data = torch.load(args.data, weights_only=True)
        calib, evaluation = data["calibration"].long(), data["evaluation"].long()
        result["calibration"] = list(calib.shape)
        result["evaluation"] = list(evaluation.shape)
        if cfg["method"] == "magnitude" and not cfg.get("force"):
            notes.append(MAGNITUDE_NOTE)
            result["offered"] = False
        else:
            model, tokenizer = load_model(data["model_folder"], data["gguf_file"])
            if cfg["method"] != "fp32":
                model = compress(model, tokenizer, calib, cfg, result)
            # peak RSS through model load and compression, before the perplexity run
            result["oneshot_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            start = time.perf_counter()
            result["perplexity"] = perplexity(model, evaluation, int(cfg["eval_batch"]))
            result["eval_s"] = round(time.perf_counter() - start, 2)
    except Exception as err:  # reported in the JSON result: one failing method must not hide the others
        traceback.print_exc(file=sys.stderr)
        result["error"] = f"{type(err).__name__}: {err}"[:2000]
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    sys.stderr.flush()
    print(json.dumps(result), file=json_out, flush=True)


if __name__ == "__main__":
    main()
