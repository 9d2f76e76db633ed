"""export_for_inference: real int8 / int4 / 2:4 layers from what the compression left; save and load them.

``export_for_inference(model)`` replaces each selected ``nn.Linear`` by an inference layer chosen from the layer
itself: a fake-quant layer (QAT, GPTQ, SmoothQuant) by its integer codes and scales, a 2:4-pruned weight by its
kept values and positions, a plain float layer by round-to-nearest codes when ``weights`` asks for them. Every
layer is planned and validated before the first one is replaced, so an error leaves the model as it was. Then a
self-check on the current device runs each layer's kernels at its real shape, drops any that disagrees with the
layer's reference path (SQNR < 40 dB), and keeps the fastest (or, ``prefer="memory"``, the fastest that holds no
dense copy); :attr:`ExportReport` says what was chosen and why.

``save_exported(model, path)`` writes ``path/model.safetensors`` and ``path/manifest.json`` (format version,
per-layer class, spec and kernel, tensor count and file size); ``load_exported(path, model)`` rebuilds the layers
into a freshly constructed plain model of the same architecture. No pickle anywhere.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_compress.callbacks.base import replace_layers, select_layers
from lightning_compress.functional.packing import is_24_sparse
from lightning_compress.functional.quant import quantize, sqnr_db
from lightning_compress.nn.calibration import Progress, call_model, eval_mode, hooks
from lightning_compress.nn.exported import FLOAT, REFERENCE, ExportedLinear, from_spec_dtype, to_spec_dtype
from lightning_compress.nn.fake_quant import ActQuantizer, SymmetricActQuantizer, is_fake_quant
from lightning_compress.nn.int4_linear import Int4Linear
from lightning_compress.nn.int8_linear import Int8Linear
from lightning_compress.nn.sparse_linear import SemiStructuredSparseLinear

log = logging.getLogger(__name__)

WEIGHTS = (None, "int8", "int4")
SPARSITIES = (None, "auto", "2:4")
PREFERENCES = ("speed", "memory", "reference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYER_CLASSES: dict[str, type[ExportedLinear]] = {
    c.__name__: c for c in (Int8Linear, Int4Linear, SemiStructuredSparseLinear)
}
FORMAT = "lightning_compress.exported"
FORMAT_VERSION = 1
MANIFEST, WEIGHTS_FILE = "manifest.json", "model.safetensors"
MIN_SQNR_DB = 40.0


@dataclass
class LayerExport:
    """What the export did with one layer: its scheme, the kernels timed (ms at ``tokens`` rows) and the choice."""

    name: str
    scheme: str
    in_features: int
    out_features: int
    tokens: int
    kernel: str = REFERENCE
    times_ms: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class ExportReport:
    """One :class:`LayerExport` per exported layer, as the self-check left them."""

    layers: list[LayerExport] = field(default_factory=list)

    def to_markdown(self) -> str:
        """A markdown table: layer, scheme, shape, kernel chosen, its speed against the dense float kernel, note."""
        rows = [
            "| layer | scheme | in → out | tokens | kernel | vs dense float | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            dense, chosen = r.times_ms.get(FLOAT), r.times_ms.get(r.kernel)
            speed = f"{dense / chosen:.2f}×" if dense and chosen else "–"
            rows.append(
                f"| {r.name} | {r.scheme} | {r.in_features} → {r.out_features} | {r.tokens} | {r.kernel} | {speed} "
                f"| {r.note} |"
            )
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ planning
def _choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {list(allowed)}")
    return value


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch float dtype (names such as ``"bfloat16"`` accepted, for YAML); None passes."""
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: None, {list(DTYPES)}")
    return dtype


def _act_args(module: nn.Module) -> dict[str, Any]:
    """Int8Linear activation arguments reproducing ``module``'s activation quantizer (weight-only if it has none)."""
    aq = getattr(module, "act_quantizer", None)
    if isinstance(aq, SymmetricActQuantizer):
        scale = aq.scale if aq.granularity == "tensor" else None
        return {"act_bits": aq.bits, "act_scale": scale, "smooth": aq.smooth}
    if isinstance(aq, ActQuantizer) and int(aq.observer.num_batches) > 0:
        s, z = aq.observer.qparams(aq.bits, symmetric=False)
        return {"act_bits": aq.bits, "act_scale": s.reshape(()), "act_zero_point": z.reshape(())}
    return {"act_bits": None}


def _fake_quant_layer(name: str, module: nn.Module, sparse: bool) -> tuple[str, ExportedLinear]:
    """The exported layer of a fake-quant Linear: its own codes and scales (int8 / int4, 2:4 when ``sparse``)."""
    wq = module.weight_quantizer
    if not module.enabled:
        raise ValueError(f"layer {name!r} has quantization disabled (QAT before start_epoch); allowed: enabled layers")
    s, z = wq.qparams(module.weight)
    codes = quantize(module.weight.detach().float(), s, z, wq.bits)
    if wq.bits <= 4:
        if sparse:
            log.info(
                "layer %s: 2:4 sparse int%d weights are exported as packed int4 (no 2:4 int4 kernel)", name, wq.bits
            )
        if getattr(module, "act_quantizer", None) is not None:
            log.warning("layer %s: its activation quantization is dropped (int4 exports weight-only)", name)
        group = wq.group_size or module.in_features
        return f"int4 g{group}", Int4Linear(codes, s, None if wq.symmetric else z, module.bias, group)
    if wq.group_size or not wq.symmetric:
        raise ValueError(
            f"layer {name!r}: int{wq.bits} weights with group_size={wq.group_size}, symmetric={wq.symmetric} have no "
            "integer kernel; allowed: symmetric per-channel weights for 5-8 bits, any granularity for 2-4 bits"
        )
    act = _act_args(module)
    if sparse:
        return "2:4 int8", SemiStructuredSparseLinear(codes, module.bias, weight_scale=s, **act)
    return "int8", Int8Linear(codes, s, module.bias, **act)


def _float_layer(
    module: nn.Linear, weights: str | None, sparse: bool, group_size: int, dtype: torch.dtype | None
) -> tuple[str, ExportedLinear] | None:
    """The exported layer of a plain float Linear (round-to-nearest when ``weights`` asks), or None: stays float."""
    if weights == "int4":
        group = group_size if module.in_features % group_size == 0 else module.in_features
        return f"int4 g{group} (RTN)", Int4Linear.from_float(module, group)
    if weights == "int8":
        rtn = Int8Linear.from_float(module)
        if sparse:
            codes = rtn.weight_t.t()
            return "2:4 int8 (RTN)", SemiStructuredSparseLinear(codes, module.bias, weight_scale=rtn.weight_scale)
        return "int8 (RTN)", rtn
    if sparse:
        return "2:4", SemiStructuredSparseLinear(module.weight.detach().to(dtype or module.weight.dtype), module.bias)
    return None


def plan_layers(
    model: nn.Module,
    weights: str | None,
    sparsity: str | None,
    targets: str | Sequence[str] | None,
    ignore: str | Sequence[str] | None,
    group_size: int = 128,
    dtype: torch.dtype | None = None,
) -> dict[str, tuple[str, ExportedLinear]]:
    """``{name: (scheme, exported layer)}`` for the selected Linears; the model is not touched. Float 2:4 values are
    kept in ``dtype`` (the weight's own when None).

    Raises:
        ValueError: a layer that cannot be exported as asked (naming it), ``sparsity="2:4"`` on a layer that is
            not 2:4 sparse, or nothing to export at all.
    """
    selected = select_layers(model, targets, ignore, accept=lambda m: isinstance(m, nn.Linear), kind="Linear")
    plan: dict[str, tuple[str, ExportedLinear]] = {}
    for name, module in selected.items():
        if is_fake_quant(module) and module.weight_quantizer.scheme == "kmeans":
            raise ValueError(f"layer {name!r} holds k-means codes; allowed: linear quantization (no k-means kernel)")
        weight = module.quantized_weight() if is_fake_quant(module) else module.weight
        sparse = sparsity is not None and module.in_features % 8 == 0 and is_24_sparse(weight.detach())
        if sparsity == "2:4" and not sparse:
            raise ValueError(f"sparsity='2:4' but layer {name!r} is not 2:4 sparse; allowed: 2:4-pruned layers")
        if is_fake_quant(module):
            plan[name] = _fake_quant_layer(name, module, sparse)
        elif (found := _float_layer(module, weights, sparse, group_size, dtype)) is not None:
            plan[name] = found
    if not plan:
        raise ValueError(
            f"nothing to export with weights={weights!r}, sparsity={sparsity!r}: the selected layers are plain float "
            "and not 2:4 sparse; allowed: weights='int8' or 'int4', or a model compressed by the callbacks"
        )
    return plan


# ------------------------------------------------------------------------------------------------ self-check
def layer_tokens(model: nn.Module, names: Sequence[str], example_inputs: Any) -> dict[str, int]:
    """Rows each layer sees (product of its input's leading dims) in one forward of ``example_inputs``."""
    seen: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, math.prod(args[0].shape[:-1]))

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    with hooks(handles), eval_mode(model), torch.no_grad():
        call_model(model, example_inputs)
    return seen


def interleaved_ms(fns: dict[str, Callable[[], Any]], repeats: int = 7, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each callable, timed A, B, C, A, B, C, ... so machine noise hits all alike (CUDA
    work is synchronised after each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):  # compilation, caches, allocator
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def choose_kernel(
    layer: ExportedLinear, tokens: int, dtype: torch.dtype, prefer: str, timings: dict[tuple, dict[str, float]]
) -> LayerExport:
    """Time ``layer``'s kernels on random ``(tokens, in)`` input in ``dtype``, verify each fast one against the
    reference (SQNR ≥ 40 dB), and set the fastest allowed by ``prefer``. Shapes already timed reuse ``timings``."""
    candidates = layer.available_kernels()
    if prefer == "reference":
        candidates = [REFERENCE]
    elif prefer == "memory":
        candidates = [k for k in candidates if k not in layer.CACHED_KERNELS]
    record = LayerExport("", "", layer.in_features, layer.out_features, tokens)
    device = next(iter(layer.buffers())).device
    x = torch.randn(tokens, layer.in_features, device=device, dtype=dtype)
    key = (type(layer).__name__, json.dumps(layer.spec(), sort_keys=True), tokens, dtype, str(device))
    timed = [k for k in dict.fromkeys([*candidates, FLOAT]) if k in layer.available_kernels()]
    if candidates != [REFERENCE]:
        timed.remove(REFERENCE)  # the reference is never the fastest; it is only timed when asked for
    fns = {}
    with torch.no_grad():
        ref = layer.reference(x)
        for kernel in timed:
            variant = copy.deepcopy(layer)  # one copy per kernel, so that the kernels can be timed interleaved
            variant.set_kernel(kernel)
            if kernel not in (REFERENCE, FLOAT) and (db := sqnr_db(ref, variant(x))) < MIN_SQNR_DB:
                record.note += f"{kernel} rejected (SQNR {db:.1f} dB); "
                continue
            fns[kernel] = functools.partial(variant, x)
        cached = timings.setdefault(key, {})
        todo = {k: f for k, f in fns.items() if k not in cached}
        cached.update(interleaved_ms(todo) if todo else {})
        record.times_ms = {k: cached[k] for k in fns}
    allowed = {k: t for k, t in record.times_ms.items() if k in candidates}
    record.kernel = min(allowed, key=allowed.get) if len(allowed) > 1 else next(iter(allowed), REFERENCE)
    layer.set_kernel(record.kernel)
    return record


def _kernel_note(layer: ExportedLinear, record: LayerExport) -> str:
    """Why a 2:4 layer computes densely, or a quantized one in float (the self-check's decision, in words)."""
    times, kernel = record.times_ms, record.kernel
    if isinstance(layer, SemiStructuredSparseLinear) and kernel != "sparse":
        if "sparse" not in times:
            return f"2:4 kernel unavailable on {next(iter(layer.buffers())).device.type}: dense {kernel}"
        return f"2:4 kept dense: sparse at {times[kernel] / times['sparse']:.2f}× the speed of dense {kernel}"
    if kernel == FLOAT and len(times) > 1:
        fast = min((t, k) for k, t in times.items() if k != FLOAT)
        return f"float faster than {fast[1]} ({fast[0] / times[FLOAT]:.2f}× its time)"
    return ""


# ------------------------------------------------------------------------------------------------ export
def export_for_inference(
    model: nn.Module,
    weights: str | None = None,
    sparsity: str | None = "auto",
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
    prefer: str = "speed",
    example_inputs: Any = None,
    tokens: int = 2048,
    group_size: int = 128,
) -> nn.Module:
    """Replace the selected Linears of ``model`` (in place) by real int8 / int4 / 2:4 inference layers.

    Args:
        model: a model as the callbacks left it (fake-quant and/or pruned layers), or a plain float model.
        weights: ``"int8"`` (per-channel round-to-nearest, dynamic per-token int8 activations) or ``"int4"``
            (group-wise, weight-only) for plain float layers; None leaves them float. Fake-quant layers always
            keep their own codes and scales.
        sparsity: ``"auto"`` uses the 2:4 layout where a weight is 2:4 sparse, ``"2:4"`` requires it of every
            selected layer, None never uses it.
        targets, ignore: regexes over Linear layer names (as the callbacks take them).
        dtype: float dtype the rest of the model computes in afterwards (``torch.bfloat16`` on CPUs with bf16
            matrix units); None keeps it.
        prefer: ``"speed"`` (fastest verified kernel per layer), ``"memory"`` (fastest among those that hold no
            dense copy of the weight), ``"reference"`` (the slow reference paths, for checking).
        example_inputs: one batch of model inputs; each layer is then timed at the rows it really sees.
        tokens: rows to time layers at when ``example_inputs`` is None.
        group_size: int4 group size for plain float layers (per channel where it does not divide the input).

    Returns:
        ``model`` itself, in eval mode, with ``model.export_report`` (:class:`ExportReport`).
    """
    _choice("weights", weights, WEIGHTS), _choice("sparsity", sparsity, SPARSITIES)
    _choice("prefer", prefer, PREFERENCES)
    dtype = check_dtype(dtype)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    with torch.no_grad():
        plan = plan_layers(model, weights, sparsity, targets, ignore, group_size, dtype)
    rows = layer_tokens(model, list(plan), example_inputs) if example_inputs is not None else {}
    device = next(iter(model.parameters())).device
    _unwrap_fake_quant(model, exclude=plan)
    if dtype is not None:
        model.to(dtype)
    replace_layers(model, {name: layer.to(device) for name, (_, layer) in plan.items()})
    compute = dtype or _float_dtype(model)
    report, timings = ExportReport(), {}
    with Progress(len(plan), "export self-check") as bar:
        for name, (scheme, layer) in plan.items():
            record = choose_kernel(layer, rows.get(name, tokens), compute, prefer, timings)
            record.name, record.scheme = name, scheme
            record.note = (record.note + _kernel_note(layer, record)).strip("; ")
            report.layers.append(record)
            bar.step(f"{name}: {record.kernel}")
    model.eval()
    model.export_report = report
    log.info("export_for_inference:\n%s", report.to_markdown())
    return model


def _unwrap_fake_quant(model: nn.Module, exclude: dict[str, Any]) -> None:
    """Turn fake-quant layers that are not exported into plain layers holding their quantized weights."""
    rest = {n: m for n, m in model.named_modules() if is_fake_quant(m) and n not in exclude}
    if rest:
        log.warning(
            "not exported, kept as float layers with their quantized weights (activations unquantized): %s",
            sorted(rest),
        )
    plain = {}
    for name, module in rest.items():
        with torch.no_grad():
            q = module.quantized_weight().detach()
            layer = module.to_module()
            layer.weight = nn.Parameter(q, requires_grad=False)
        plain[name] = layer
    replace_layers(model, plain)


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first float parameter or buffer outside the exported layers (float32 if none)."""
    for module in model.modules():
        if isinstance(module, ExportedLinear):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.is_floating_point():
                return t.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------------ save / load
def exported_layers(model: nn.Module) -> dict[str, ExportedLinear]:
    """``{name: layer}`` of the exported layers in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExportedLinear)}


def save_exported(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (after :func:`export_for_inference`) to the directory ``path``.

    ``model.safetensors`` holds every tensor of the state dict (tensors sharing storage, such as tied embeddings,
    are stored once and listed as aliases); ``manifest.json`` holds the format version, the float dtype, each
    exported layer's class, spec and kernel, and the file size (to detect truncation).

    Returns:
        ``path`` as a Path.
    """
    layers = exported_layers(model)
    if not layers:
        raise ValueError("model has no exported layers; call export_for_inference(model) first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": to_spec_dtype(_float_dtype(model)),
        "layers": {n: {"class": type(m).__name__, "spec": m.spec(), "kernel": m.kernel} for n, m in layers.items()},
        "aliases": aliases,
        "tensors": len(tensors),
        "file_bytes": (path / WEIGHTS_FILE).stat().st_size,
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an exported directory, validated (format, version, file present and complete)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path / MANIFEST} not found; allowed: a directory written by save_exported")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version!r}, newer than this lightning_compress reads ({FORMAT_VERSION}); "
            "upgrade lightning_compress"
        )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    if weights.stat().st_size != manifest["file_bytes"]:
        raise ValueError(
            f"{weights} has {weights.stat().st_size} bytes but the manifest says {manifest['file_bytes']}: "
            "truncated or replaced"
        )
    return manifest


def load_exported(path: str | Path, model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild an exported model from ``path`` into ``model``, a freshly constructed plain instance of the same
    architecture (no callbacks, no training code). The saved kernels are used where available on ``device``,
    otherwise the fastest remaining one that needs no timing: the fast path, else float.

    Returns:
        ``model`` in eval mode, on ``device`` (the model's device when None).
    """
    manifest = read_manifest(path)
    try:
        tensors = load_file(Path(path) / WEIGHTS_FILE)
    except SafetensorError as err:
        raise ValueError(f"{Path(path) / WEIGHTS_FILE} is corrupt or truncated: {err}") from None
    for key, source in manifest["aliases"].items():
        if source in tensors:
            tensors[key] = tensors[source]
    device = torch.device(device) if device is not None else next(iter(model.parameters())).device
    new = {}
    for name, entry in manifest["layers"].items():
        if entry["class"] not in LAYER_CLASSES:
            raise ValueError(f"layer {name!r}: unknown class {entry['class']!r}; allowed: {sorted(LAYER_CLASSES)}")
        try:
            plain = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the manifest's layer {name!r} does not exist in {type(model).__name__}") from None
        saved = (entry["spec"]["in_features"], entry["spec"]["out_features"])
        if (getattr(plain, "in_features", None), getattr(plain, "out_features", None)) != saved:
            raise ValueError(f"layer {name!r} is {plain} in the model but {saved[0]} → {saved[1]} in {path}")
        new[name] = LAYER_CLASSES[entry["class"]].from_spec(entry["spec"])
    model.to(device=device, dtype=from_spec_dtype(manifest["dtype"]))
    replace_layers(model, {n: m.to(device) for n, m in new.items()})
    missing, unexpected = _load_state(model, tensors)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing tensors {missing}, unexpected {unexpected}")
    for name, layer in new.items():
        _restore_kernel(name, layer, manifest["layers"][name]["kernel"])
    return model.eval()


def _load_state(model: nn.Module, tensors: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Load ``tensors`` (strict keys, shapes checked); returns the missing and unexpected keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        return missing, unexpected
    for key, t in tensors.items():
        if t.shape != expected[key].shape:
            raise ValueError(
                f"tensor {key!r} has shape {tuple(t.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(tensors, strict=True)
    return [], []


def _restore_kernel(name: str, layer: ExportedLinear, kernel: str) -> None:
    available = layer.available_kernels()
    if kernel not in available:
        fast = [k for k in available if k not in (REFERENCE, FLOAT)]
        fallback = fast[0] if fast else FLOAT
        log.warning("layer %s: kernel %r is not available here; using %r", name, kernel, fallback)
        kernel = fallback
    layer.set_kernel(kernel)
