"""The export self-check: time each layer's kernels at its real shape, verify them, keep the fastest.

A kernel that disagrees with the layer's reference path (SQNR < 40 dB) is dropped; of the rest the fastest is kept
(or, ``prefer="memory"``, the fastest that holds no dense copy). :class:`ExportReport` says what was chosen and why."""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.calibration.batches import call_model
from lightning_compress.calibration.capture import eval_mode, hooks
from lightning_compress.export.layer import FLOAT, REFERENCE, SMALL_ROWS, ExportedLayer, ExportedLinear
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.functional.quant import sqnr_db

MIN_SQNR_DB = 40.0


@dataclass
class LayerExport:
    """What the export did with one layer: its layout (what it became), the kernels timed (ms at ``tokens`` rows)
    and the choice."""

    name: str
    layout: str
    in_features: int
    out_features: int
    tokens: int
    kernel: str = REFERENCE
    times_ms: dict[str, float] = field(default_factory=dict)
    note: str = ""
    small_kernel: str | None = None  # the kernel for inputs of at most SMALL_ROWS rows, when it differs
    small_times_ms: dict[str, float] = field(default_factory=dict)  # ms at 1 row + ms at SMALL_ROWS rows


@dataclass
class ExportReport:
    """One :class:`LayerExport` per exported layer, as the self-check left them."""

    layers: list[LayerExport] = field(default_factory=list)

    def to_markdown(self) -> str:
        """A markdown table: layer, layout, shape, kernel chosen, its speed against the dense float kernel, note."""
        rows = [
            "| layer | layout | in → out | tokens | kernel | vs dense float | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            dense, chosen = r.times_ms.get(FLOAT), r.times_ms.get(r.kernel)
            speed = f"{dense / chosen:.2f}×" if dense and chosen else "–"
            kernel = r.kernel if r.small_kernel is None else f"{r.kernel} (≤ {SMALL_ROWS} rows: {r.small_kernel})"
            rows.append(
                f"| {r.name} | {r.layout} | {r.in_features} → {r.out_features} | {r.tokens} | {kernel} | {speed} "
                f"| {r.note} |"
            )
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ self-check
def layer_input_shapes(model: nn.Module, names: Sequence[str], example_inputs: Any) -> dict[str, tuple[int, ...]]:
    """The shape of each layer's input in one forward of ``example_inputs`` (its first call)."""
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, tuple(args[0].shape))

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


def rows_of(layer: ExportedLayer, shape: tuple[int, ...]) -> int:
    """Rows (tokens) of an input of ``shape``: its leading dims for a Linear, batch x positions for a conv."""
    return math.prod(shape[:-1]) if isinstance(layer, ExportedLinear) else shape[0] * math.prod(shape[2:])


def choose_kernel(
    layer: ExportedLayer,
    tokens: int,
    dtype: torch.dtype,
    prefer: str,
    timings: dict[tuple, dict[str, float]],
    shape: tuple[int, ...] | None = None,
) -> LayerExport:
    """Time ``layer``'s kernels on a random input in ``dtype`` (of ``shape``, an example input's, else ``tokens``
    rows: :meth:`~ExportedLayer.random_input`), verify each fast one against the reference (SQNR ≥ 40 dB), and set
    the fastest allowed by ``prefer``; for a Linear seeing more than :data:`SMALL_ROWS` rows, also time 1 and
    :data:`SMALL_ROWS` rows (decoding) and keep the kernel fastest over both as its small-rows kernel. Shapes
    already timed reuse ``timings``."""
    candidates = layer.available_kernels()
    if prefer == "reference":
        candidates = [REFERENCE]
    elif prefer == "memory":
        candidates = [k for k in candidates if k not in layer.CACHED_KERNELS]
    tokens = tokens if shape is None else rows_of(layer, shape)
    record = LayerExport("", "", layer.in_features, layer.out_features, tokens)
    record.kernel, record.times_ms, record.note = _fastest(layer, tokens, dtype, candidates, timings, shape)
    if isinstance(layer, ExportedLinear) and tokens > SMALL_ROWS and candidates != [REFERENCE]:
        one, many = (_fastest(layer, rows, dtype, candidates, timings)[1] for rows in (1, SMALL_ROWS))
        record.small_times_ms = {k: one[k] + many[k] for k in one if k in many}  # 1 and SMALL_ROWS rows, summed
        small = _pick(record.small_times_ms, candidates)
        record.small_kernel = None if small == record.kernel else small
    layer.set_kernel(record.kernel, record.small_kernel)
    return record


def _fastest(
    layer: ExportedLayer,
    rows: int,
    dtype: torch.dtype,
    candidates: list[str],
    timings: dict[tuple, dict[str, float]],
    shape: tuple[int, ...] | None = None,
) -> tuple[str, dict[str, float], str]:
    """(the fastest verified kernel of ``candidates`` at ``rows`` rows or on ``shape``, ms of each kernel timed,
    rejection notes)."""
    device = next(iter(layer.buffers())).device
    x = layer.random_input(rows, dtype, shape)
    key = (type(layer).__name__, json.dumps(layer.spec(), sort_keys=True), rows, shape, dtype, str(device))
    timed = [k for k in dict.fromkeys([*candidates, FLOAT]) if k in layer.available_kernels()]
    if candidates != [REFERENCE]:
        timed.remove(REFERENCE)  # the reference is never the fastest; it is only timed when asked for
    fns, note = {}, ""
    with torch.no_grad():
        ref = layer.reference(x)
        for kernel in timed:
            variant = copy.deepcopy(layer)  # one copy per kernel, so that the kernels can be timed interleaved
            variant.set_kernel(kernel)
            if kernel not in (REFERENCE, FLOAT) and (db := sqnr_db(ref, variant(x))) < MIN_SQNR_DB:
                note += f"{kernel} rejected (SQNR {db:.1f} dB); "
                continue
            fns[kernel] = functools.partial(variant, x)
        cached = timings.setdefault(key, {})
        todo = {k: f for k, f in fns.items() if k not in cached}
        cached.update(interleaved_ms(todo) if todo else {})
        times = {k: cached[k] for k in fns}
    return _pick(times, candidates), times, note


def _pick(times: dict[str, float], candidates: list[str]) -> str:
    """The fastest of ``candidates`` in ``times`` (reference when none was timed)."""
    allowed = {k: t for k, t in times.items() if k in candidates}
    return min(allowed, key=allowed.get) if len(allowed) > 1 else next(iter(allowed), REFERENCE)


def kernel_note(layer: ExportedLayer, record: LayerExport) -> str:
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
