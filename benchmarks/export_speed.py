"""Exported inference layers on this CPU, side by side in one run: our int8 kernels (``torch._int_mm`` and oneDNN's
prepacked int8 linear / conv) against FP32, bf16, torch.ao and torchao; per layer, MiniLM end to end, two CNNs, and
SmolLM2 generation; bytes on disk of the int8, int4 and 2:4 + int8 exports.

1. Per layer at MiniLM's shapes (4096 tokens) and 4096 -> 4096 (2048 tokens, and 1 token: decoding): median ms of
   FP32 / bf16 ``nn.Linear``, torch.ao dynamic int8, and Int8Linear's two int8 kernels on bf16 input.
2. End to end, all-MiniLM-L6-v2 at batch 32 x 128 tokens of Brown-corpus text (no padding): median ms, speed-up
   against FP32 and bf16, mean sentence-embedding cosine to FP32 over 4 such batches, bytes the Linear weights take;
   the peers torch.ao ``quantize_dynamic`` and torchao's int8 dynamic-activation config (eager and compiled).
3. CNNs (convs included): the digits CNN and a ResNet-style CNN on Fashion-MNIST, QAT int8 for a few steps, then
   exported; FP32 / bf16 / our export, and top-1 agreement of the export with the fake-quant model on the test set.
4. SmolLM2-135M greedy generation of 128 tokens at batch 1: tokens/s of FP32, bf16, our int8 and int4 exports.
5. On disk: ``save_exported`` of MiniLM (the whole model, and its encoder alone, whose Linears are what the
   formats compress; the 30522 x 384 word embeddings stay float) against the FP32 safetensors file.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from benchmarks import Table, interleaved_medians, quiet
from lightning_compress.examples.brown import read_brown
from lightning_compress.examples.pretrained import load_pretrained, mean_pool
from lightning_compress.export.int8_linear import Int8Linear
from lightning_compress.export.io import exported_layers, save_exported
from lightning_compress.export.layer import SMALL_ROWS
from lightning_compress.export.onednn import onednn_unsupported_reason
from lightning_compress.export.plan import export_for_inference
from lightning_compress.functional.masks import nm_mask
from lightning_compress.functional.quant import sqnr_db

SHAPES = [(384, 1536, 4096), (1536, 384, 4096), (4096, 4096, 2048), (4096, 4096, 1)]  # (in, out, tokens)
BATCH, SEQ, EVAL_BATCHES = 32, 128, 4
NEW_TOKENS = 128
TARGET_E2E_BF16_AMX, TARGET_E2E_FP32_AMX, TARGET_E2E_BF16, TARGET_COSINE = 1.3, 3.0, 1.1, 0.99
TARGET_LAYER_BF16_AMX, TARGET_INT4_DECODE, TARGET_INT8_DECODE = 1.5, 1.5, 1.2
TARGET_CNN_BF16, TARGET_CNN_AGREEMENT = 1.2, 0.999


def ao_dynamic(model: nn.Module) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` int8 of every Linear (what a user of torch.ao picks)."""
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def torchao_int8(model: nn.Module, compiled: bool) -> nn.Module:
    """torchao's ``Int8DynamicActivationInt8WeightConfig`` on every Linear of a bf16 copy (``torch.compile`` d)."""
    from benchmarks.peers import ensure_in_project

    ensure_in_project("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    out = copy.deepcopy(model).bfloat16()
    quantize_(out, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(out) if compiled else out


def beside_fp32(fn: Callable[[], object], fp32: Callable[[], object], fp32_time: float, repeats: int = 7) -> float:
    """Seconds of ``fn`` timed interleaved with the FP32 model alone, scaled to the main run's FP32 time.

    torch.ao's fbgemm kernels and torchao's cannot share the main interleaved loop: after a torch.ao call the next
    ``torch._int_mm`` runs ~1.4× slower here (thread-pool / cache state).
    """
    pair = interleaved_medians({"fn": fn, "fp32": fp32}, repeats=repeats)
    return pair["fn"] * fp32_time / pair["fp32"]


def with_kernel(layer: Int8Linear, kernel: str) -> Int8Linear:
    """A copy of ``layer`` computing with ``kernel``."""
    out = copy.deepcopy(layer)
    out.set_kernel(kernel)
    return out


def _ms(times: dict[str, float], key: str) -> str:
    return f"{1e3 * times[key]:.3f}" if key in times else "–"


def _ratio(times: dict[str, float], slow: str, fast: str) -> str:
    return f"{times[slow] / times[fast]:.2f}×" if slow in times and fast in times else "–"


def layer_table() -> Table:
    onednn = onednn_unsupported_reason() is None
    table = Table(
        "Int8Linear's kernels against FP32, bf16 and torch.ao dynamic int8, one layer (CPU)",
        ["in → out", "tokens", "FP32 ms", "bf16 ms", "torch.ao ms", "_int_mm ms", "oneDNN ms", "_int_mm vs bf16",
         "oneDNN vs bf16", "oneDNN vs FP32", "oneDNN SQNR vs FP32 (dB)"],
    )  # fmt: skip
    for k, n, m in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(k, n).eval()
        x = torch.randn(m, k)
        bf16, ao = copy.deepcopy(lin).bfloat16(), ao_dynamic(nn.Sequential(lin))
        int8 = Int8Linear.from_module(lin)
        kernels = {"int_mm": with_kernel(int8, "int8"), **({"onednn": with_kernel(int8, "onednn")} if onednn else {})}
        xb = x.bfloat16()
        with torch.inference_mode():
            ref = lin(x)
            fns = {"fp32": (lin, x), "bf16": (bf16, xb), **{key: (layer, xb) for key, layer in kernels.items()}}
            for layer in kernels.values():  # compile before anything is timed
                for _ in range(3):
                    layer(xb)
            t = interleaved_medians({key: functools.partial(f, a) for key, (f, a) in fns.items()}, repeats=7)
            t["ao"] = beside_fp32(functools.partial(ao, x), functools.partial(lin, x), t["fp32"])
            db = sqnr_db(ref, kernels["onednn"](xb).float()) if onednn else float("nan")
        table.rows.append([
            f"{k} → {n}", m, *(_ms(t, key) for key in ("fp32", "bf16", "ao", "int_mm", "onednn")),
            _ratio(t, "bf16", "int_mm"), _ratio(t, "bf16", "onednn"), _ratio(t, "fp32", "onednn"), f"{db:.1f}",
        ])  # fmt: skip
    table.notes.append(
        f"Target (AMX machines): oneDNN int8 ≥ {TARGET_LAYER_BF16_AMX}× bf16 for K ≥ 1024. Both int8 kernels take "
        "bf16 input (what the bf16 model feeds them), quantize it per token (a C++ pass up to 128 rows, compiled "
        "above), multiply with int32 "
        "accumulation and rescale; 'vs bf16' is against bf16 nn.Linear. torch.ao is timed beside FP32 alone."
        + ("" if onednn else f" oneDNN int8 unavailable here: {onednn_unsupported_reason()}.")
    )
    return table


def text_batches(tokenizer: object, n: int) -> list[dict[str, Tensor]]:
    """``n`` batches of BATCH x SEQ tokens of running Brown text (each row a document's opening), no padding."""
    docs = read_brown()
    rows = []
    for doc in docs[: n * BATCH]:
        ids = tokenizer(" ".join(doc.sentences[:40]), truncation=True, max_length=SEQ)["input_ids"]
        rows.append(ids + [0] * (SEQ - len(ids)))
    ids = torch.tensor(rows)
    mask = (ids != 0).long()
    return [
        {"input_ids": ids[i : i + BATCH], "attention_mask": mask[i : i + BATCH]} for i in range(0, len(rows), BATCH)
    ]


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes the Linear weights take in memory: nn.Linear weight tensors, or the exported layers' buffers."""
    exported = exported_layers(model)
    if exported:
        return sum(m.storage_bytes() - (0 if m.bias is None else m.bias.numel() * 4) for m in exported.values())
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def end_to_end_table() -> Table:
    model, tokenizer = load_pretrained("all-MiniLM-L6-v2")
    model = model.eval()
    batches = text_batches(tokenizer, EVAL_BATCHES)
    timing = batches[0]
    ao, tao, tao_c = "torch.ao quantize_dynamic int8", "torchao int8 dynamic-activation", "torchao int8, compiled"
    variants: dict[str, Callable[[], nn.Module]] = {
        "FP32": lambda: model,
        "bf16 (weights and activations)": lambda: copy.deepcopy(model).bfloat16(),
        ao: lambda: ao_dynamic(model),
        tao: lambda: torchao_int8(model, compiled=False),
        tao_c: lambda: torchao_int8(model, compiled=True),
        "ours: Int8Linear everywhere, _int_mm, bf16 rest": lambda: _export(model, "int8"),
        "ours: Int8Linear everywhere, oneDNN, bf16 rest": lambda: _export(model, "onednn"),
        "ours: export_for_inference (per layer, by measuring), bf16 rest": lambda: _export(model, None, timing),
    }
    if onednn_unsupported_reason() is not None:
        del variants["ours: Int8Linear everywhere, oneDNN, bf16 rest"]
    built = {name: make() for name, make in variants.items()}
    with torch.inference_mode():
        ref = [mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches]
        cosines = {}
        for name, m in built.items():  # also compiles what is compiled, before any timing
            emb = [mean_pool(m(**b).last_hidden_state.float(), b["attention_mask"]) for b in batches]
            cosines[name] = float(torch.cat([F.cosine_similarity(r, e) for r, e in zip(ref, emb, strict=True)]).mean())
        calls = {name: functools.partial(_forward, m, timing) for name, m in built.items()}
        apart = (ao, tao, tao_c)
        times = interleaved_medians({k: f for k, f in calls.items() if k not in apart}, repeats=5)
        for name in apart:
            times[name] = beside_fp32(calls[name], calls["FP32"], times["FP32"], repeats=5)
    table = Table(
        f"all-MiniLM-L6-v2 end to end, batch {BATCH} × {SEQ} tokens (CPU)",
        ["model", "ms", "vs FP32", "vs bf16", "embedding cosine to FP32", "Linear weight bytes"],
    )
    fp32, bf16 = times["FP32"], times["bf16 (weights and activations)"]
    for name, m in built.items():
        table.rows.append([
            name, f"{1e3 * times[name]:.0f}", f"{fp32 / times[name]:.2f}×", f"{bf16 / times[name]:.2f}×",
            f"{cosines[name]:.4f}", "–" if name in apart else f"{linear_weight_bytes(m) / 1e6:.2f} MB",
        ])  # fmt: skip
    choice = built["ours: export_for_inference (per layer, by measuring), bf16 rest"].export_report
    kernels = sorted({(r.in_features, r.out_features, r.kernel) for r in choice.layers})
    table.notes += [
        f"Targets: ≥ {TARGET_E2E_BF16_AMX}× bf16 and ≥ {TARGET_E2E_FP32_AMX}× FP32 on an AMX machine, ≥ "
        f"{TARGET_E2E_BF16}× bf16 without AMX, at cosine ≥ {TARGET_COSINE}; never below bf16 (the self-check keeps "
        "bf16 where int8 is slower).",
        "The per-layer export chose (in, out, kernel): " + ", ".join(f"{k}→{n} {kern}" for k, n, kern in kernels),
        "Rows are timed interleaved (5 repeats, median), except torch.ao's and torchao's: each is timed interleaved "
        "with FP32 alone and scaled to the main run's FP32 time (after a torch.ao call the next torch._int_mm runs "
        "~1.4× slower here, which would penalise whatever follows it). torchao quantizes a bf16 copy of the model.",
    ]
    return table


def _forward(model: nn.Module, batch: dict[str, Tensor]) -> object:
    return model(**batch)


def _export(model: nn.Module, kernel: str | None, example: dict | None = None) -> nn.Module:
    """An int8 export of a copy of ``model`` with a bf16 rest: every Linear on ``kernel``, or (None) what the
    self-check picks at ``example``'s shapes."""
    prefer = "speed" if kernel is None else "memory"
    out = export_for_inference(copy.deepcopy(model), weights="int8", dtype=torch.bfloat16, prefer=prefer,
                               example_inputs=example, tokens=64)  # fmt: skip
    if kernel is not None:
        for layer in exported_layers(out).values():
            layer.set_kernel(kernel)
    return out


# ------------------------------------------------------------------------------------------------ CNNs
def _qat_cnn(kind: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """(plain float model, QAT int8 fake-quant model, test images, test labels) for ``kind``."""
    import lightning.pytorch as pl

    from benchmarks import trainer
    from lightning_compress import QATFakeQuant
    from lightning_compress.examples.custom import ResCNN
    from lightning_compress.examples.images import DigitsDataModule, FashionMNISTDataModule
    from lightning_compress.examples.models import ImageClassifier, SmallCNN

    pl.seed_everything(0)
    if kind == "digits":
        model, dm, steps = ImageClassifier(SmallCNN()), DigitsDataModule(), None
    else:
        model, dm, steps = ResCNN(width=64, num_blocks=4), FashionMNISTDataModule(batch_size=128), 60
    plain = copy.deepcopy(model).eval()
    kwargs = {"limit_train_batches": steps, "limit_val_batches": 2} if steps else {}
    trainer(1, [QATFakeQuant(bits=8, act_bits=8)], **kwargs).fit(model, dm)
    dm.setup("test")
    images, labels = (torch.cat(t) for t in zip(*dm.test_dataloader(), strict=True))
    return plain, model.eval(), images, labels


def cnn_table() -> Table:
    table = Table(
        "CNNs, int8 export with the convs: FP32 / bf16 / ours (CPU)",
        ["model", "batch", "FP32 ms", "bf16 ms", "bf16 channels_last ms", "ours: int8 export ms", "vs FP32",
         "vs best bf16", "top-1 agreement with the fake-quant model", "accuracy: fake-quant / export", "kernels"],
    )  # fmt: skip
    for kind, label, batch in (
        ("digits", "digits CNN (2 convs, 8×8)", 360),
        ("rescnn", "ResCNN (9 convs, 64 ch, Fashion-MNIST 28×28)", 256),
    ):
        plain, fq, images, labels = _qat_cnn(kind)
        x = images[:batch]
        exported = export_for_inference(copy.deepcopy(fq), dtype=torch.bfloat16, example_inputs=x)
        bf16 = copy.deepcopy(plain).bfloat16()
        bf16_cl = copy.deepcopy(bf16).to(memory_format=torch.channels_last)
        xb = x.bfloat16()
        with torch.inference_mode():
            fq_top = torch.cat([fq(c).argmax(1) for c in images.split(512)])
            ex_top = torch.cat([exported(c.bfloat16()).argmax(1) for c in images.split(512)])
            fns = {
                "fp32": functools.partial(plain, x), "bf16": functools.partial(bf16, xb),
                "bf16_cl": functools.partial(bf16_cl, xb.contiguous(memory_format=torch.channels_last)),
                "ours": functools.partial(exported, xb),
            }  # fmt: skip
            t = interleaved_medians(fns, repeats=9)
        best_bf16 = min(t["bf16"], t["bf16_cl"])
        agreement = float((fq_top == ex_top).float().mean())
        acc = f"{float((fq_top == labels).float().mean()):.4f} / {float((ex_top == labels).float().mean()):.4f}"
        kernels = sorted({f"{r.layout}: {r.kernel}" for r in exported.export_report.layers})
        table.rows.append([
            label, batch, *(f"{1e3 * t[k]:.2f}" for k in ("fp32", "bf16", "bf16_cl", "ours")),
            f"{t['fp32'] / t['ours']:.2f}×", f"{best_bf16 / t['ours']:.2f}×", f"{agreement:.4f} ({len(labels)} images)",
            acc, ", ".join(kernels),
        ])  # fmt: skip
    table.notes += [
        f"Targets: top-1 agreement ≥ {TARGET_CNN_AGREEMENT} with the fake-quant model and ≥ {TARGET_CNN_BF16}× "
        "the faster bf16 layout end to end. QAT: QATFakeQuant(bits=8, act_bits=8), one epoch on the digits, 60 steps "
        "of 128 on Fashion-MNIST; the export keeps each conv's static input scale and zero-point from its observer. "
        "FP32 / bf16: the float model before QAT (same shapes).",
    ]
    return table


# ------------------------------------------------------------------------------------------------ decoding
def _llm_export(model: nn.Module, example: dict, weights: str, targets: list[str] | None = None) -> nn.Module:
    """An int8 / int4 (groups of 64) export of a copy of ``model``, bf16 rest, timed at ``example``'s rows."""
    return export_for_inference(copy.deepcopy(model), weights=weights, group_size=64, dtype=torch.bfloat16,
                                example_inputs=example, targets=targets)  # fmt: skip


def decode_table() -> Table:
    model, tokenizer = load_pretrained("smollm2", task="causal_lm")
    model = model.eval()
    doc = read_brown()[0]
    prompt = tokenizer(" ".join(doc.sentences[:3]), return_tensors="pt", truncation=True, max_length=64)
    example = {"input_ids": prompt["input_ids"]}
    head = [r".*_proj", "lm_head"]  # every Linear, the tied output embedding included
    variants: dict[str, Callable[[], nn.Module]] = {
        "FP32": lambda: model,
        "bf16": lambda: copy.deepcopy(model).bfloat16(),
        "ours: int8 (W8A8, per-token), bf16 rest": lambda: _llm_export(model, example, "int8"),
        "ours: int8, lm_head int8 too": lambda: _llm_export(model, example, "int8", targets=head),
        "ours: int4 (weight-only, groups of 64), bf16 rest": lambda: _llm_export(model, example, "int4"),
        "ours: int4, lm_head int4 too": lambda: _llm_export(model, example, "int4", targets=head),
    }
    built = {name: make() for name, make in variants.items()}
    outputs: dict[str, Tensor] = {}

    def generate(name: str) -> None:
        with torch.inference_mode():
            out = built[name].generate(
                **prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        outputs[name] = out[0, prompt["input_ids"].shape[1] :]

    t = interleaved_medians({name: functools.partial(generate, name) for name in built}, repeats=3, warmup=1)
    table = Table(
        f"SmolLM2-135M greedy generation, batch 1, {prompt['input_ids'].shape[1]}-token prompt + {NEW_TOKENS} tokens "
        "(CPU)",
        [
            "model",
            "s",
            "tokens/s",
            "vs FP32",
            "vs bf16",
            "tokens equal to FP32's",
            f"kernels (prefill / ≤ {SMALL_ROWS} rows)",
        ],
    )
    for name in built:
        same = int((outputs[name] == outputs["FP32"]).long().cumprod(0).sum())
        report = getattr(built[name], "export_report", None)
        kernels = "–" if report is None else ", ".join(sorted(
            {f"{r.kernel} / {r.small_kernel or r.kernel}" for r in report.layers}))  # fmt: skip
        table.rows.append([
            name, f"{t[name]:.2f}", f"{NEW_TOKENS / t[name]:.1f}", f"{t['FP32'] / t[name]:.2f}×",
            f"{t['bf16'] / t[name]:.2f}×", f"{same} of {NEW_TOKENS}", kernels,
        ])  # fmt: skip
    table.notes += [
        f"Targets: int4 ≥ {TARGET_INT4_DECODE}× and int8 ≥ {TARGET_INT8_DECODE}× bf16 tokens/s. Each exported layer "
        f"holds two kernels: the one the self-check timed fastest at the prompt's rows (prefill) and the one "
        f"fastest over 1 and {SMALL_ROWS} rows (decoding), picked per call by row count. lm_head (tied to the "
        "embedding, 49152 × 576: the largest matmul of a decoding step) stays bf16 by default, as the selection "
        "leaves output embeddings out; the 'lm_head too' rows name it in targets. Median of 3 interleaved runs; "
        "'tokens equal' counts the leading generated tokens identical to FP32's.",
    ]
    return table


class LlamaBlock(nn.Module):
    """The seven Linears of a Llama decoder block (no bias), hidden 1024, MLP 2816: a linear-dominated model."""

    def __init__(self, hidden: int = 1024, mlp: int = 2816) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(hidden, mlp, bias=False), nn.Linear(hidden, mlp, bias=False)
        self.down = nn.Linear(mlp, hidden, bias=False)


def _prune_24(model: nn.Module) -> nn.Module:
    """A copy with every Linear of the encoder (or the whole model) magnitude-pruned to 2:4 (sizes only)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in getattr(model, "encoder", model).modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(nm_mask(m.weight, 2, 4))
    return model


FORMATS = {
    "int8 (W8A8)": lambda m: export_for_inference(m, weights="int8", prefer="memory", tokens=64),
    "int4, groups of 128": lambda m: export_for_inference(m, weights="int4", prefer="memory", tokens=64),
    "2:4 + int8": lambda m: export_for_inference(_prune_24(m), weights="int8", prefer="memory", tokens=64),
}


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def disk_table() -> Table:
    minilm, _ = load_pretrained("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    models = {
        "all-MiniLM-L6-v2, whole": lambda m: m,
        "all-MiniLM-L6-v2, encoder": lambda m: m.encoder,
        "Llama-shaped block (hidden 1024)": None,
    }
    table = Table(
        "Bytes on disk: save_exported against the FP32 safetensors file",
        ["model", "FP32 MB", *(f"{name} MB (vs FP32)" for name in FORMATS)],
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (label, part) in enumerate(models.items()):
            base_model = minilm.eval() if part else LlamaBlock()
            module = part(base_model) if part else base_model
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{i}.safetensors")
            fp32 = _bytes(tmp / f"{i}.safetensors")
            row = [label, f"{fp32 / 1e6:.2f}"]
            for j, export in enumerate(FORMATS.values()):
                full = export(copy.deepcopy(base_model))
                size = _bytes(save_exported(part(full) if part else full, tmp / f"{i}-{j}"))
                row.append(f"{size / 1e6:.2f} ({size / fp32:.3f}×)")
            table.rows.append(row)
    table.notes += [
        "Targets: 2:4 + int8 ≤ 0.16× and int4 group-128 ≤ 0.14× of FP32. MiniLM's word-embedding table (half of "
        "its parameters) stays float32 in every format, so the whole model cannot get there; its encoder can "
        "nearly: 2:4 + int8 costs 0.5 + 0.125 bytes per weight (values, 2-bit positions) = 0.156× plus a float32 "
        "scale and bias per output row, 2 / in_features of FP32 = 0.005× at in_features 384.",
    ]
    return table


def run() -> list[Table]:
    quiet()
    torch.manual_seed(0)
    return [layer_table(), end_to_end_table(), cnn_table(), decode_table(), disk_table()]
