"""What each selected Linear / Conv2d becomes, and ``export_for_inference``, which plans, validates, swaps and
self-checks.

``export_for_inference(model)`` replaces each selected ``nn.Linear`` by an inference layer chosen from the layer
itself: a fake-quant layer (QAT, GPTQ, SmoothQuant) by its integer codes and scales, a 2:4-pruned weight by its
kept values and positions, a plain float layer by round-to-nearest codes when ``weights`` asks for them. A
fake-quant ``nn.Conv2d`` with int8 (or narrower) per-channel weights and a calibrated static input range becomes
an :class:`~lightning_compress.export.int8_conv.Int8Conv2d`; other convs stay float. Every
layer is planned and validated before the first one is replaced, so an error leaves the model as it was. Then the
self-check (:mod:`~lightning_compress.export.selfcheck`) picks each layer's kernel on the current device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress.calibration.progress import Progress
from lightning_compress.export.int4_linear import Int4Linear
from lightning_compress.export.int8_conv import Int8Conv2d, conv_geometry
from lightning_compress.export.int8_linear import Int8Linear
from lightning_compress.export.kept import input_quantized
from lightning_compress.export.layer import ExportedLayer, float_dtype
from lightning_compress.export.selfcheck import ExportReport, choose_kernel, kernel_note, layer_input_shapes
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.functional.checks import check_choice, check_positive_int
from lightning_compress.functional.packing import is_24_sparse
from lightning_compress.nn.fake_quant import is_fake_quant
from lightning_compress.nn.quantized import QuantizedInput, round_to_nearest
from lightning_compress.nn.select import replace_layers, select_layers

log = logging.getLogger(__name__)


WEIGHTS = (None, "int8", "int4")


SPARSITIES = (None, "auto", "2:4")


PREFERENCES = ("speed", "memory", "reference")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ planning
def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch float dtype (names such as ``"bfloat16"`` accepted, for YAML); None passes."""
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: None, {list(DTYPES)}")
    return dtype


def _fake_quant_layer(name: str, module: nn.Module, sparse: bool) -> tuple[str, ExportedLayer]:
    """The exported layer of a fake-quant Linear: its own codes and scales (int8 / int4, 2:4 when ``sparse``)."""
    if not module.enabled:
        raise ValueError(f"layer {name!r} has quantization disabled (QAT before start_epoch); allowed: enabled layers")
    quantized = module.quantized()
    weight = quantized.weight
    if weight.bits <= 4:
        if sparse:
            log.info(
                "layer %s: 2:4 sparse int%d weights are exported as packed int4 (no 2:4 int4 kernel)", name, weight.bits
            )
        if getattr(module, "act_quantizer", None) is not None:
            log.warning("layer %s: its activation quantization is dropped (int4 exports weight-only)", name)
        return f"int4 g{weight.group_size or module.in_features}", Int4Linear.from_quantized(weight, module.bias)
    if weight.group_size or not weight.symmetric:
        raise ValueError(
            f"layer {name!r}: int{weight.bits} weights with group_size={weight.group_size}, symmetric="
            f"{weight.symmetric} have no integer kernel; allowed: symmetric per-channel weights for 5-8 bits, any "
            "granularity for 2-4 bits"
        )
    if sparse:
        return "2:4 int8", SemiStructuredSparseLinear.from_quantized(weight, module.bias, quantized.input)
    return "int8", Int8Linear.from_quantized(weight, module.bias, quantized.input)


def _conv_layer(name: str, module: nn.Conv2d) -> tuple[str, ExportedLayer] | None:
    """The :class:`Int8Conv2d` of a fake-quant Conv2d with int8-or-narrower symmetric per-channel weights and a static
    input range, or None: the conv is kept as a float layer (:func:`kept_layers`), and why is logged. Plain float
    convs stay float: an int8 conv needs the input range an observer calibrated (``QATFakeQuant``)."""
    if not is_fake_quant(module) or not module.enabled:
        return None
    quantized = module.quantized()
    weight, act = quantized.weight, quantized.input
    why = None
    if module.weight_quantizer.method != "linear" or weight.format != "int":
        why = f"{module.weight_quantizer.method} weights"
    elif weight.group_size is not None or not weight.symmetric:
        why = "grouped or asymmetric weights"
    elif act is None or act.dynamic or act.method != "linear":
        why = "no static input range (weight-only, dynamic or FP8 inputs)"
    else:
        try:
            conv_geometry(module)
        except ValueError as err:
            why = str(err)
    if why is not None:
        log.info("layer %s: kept as a float conv (%s; Int8Conv2d takes static-input int8 convs)", name, why)
        return None
    return "int8 conv", Int8Conv2d.from_quantized(weight, module, act)


def _float_layer(
    name: str, module: nn.Linear, weights: str | None, sparse: bool, group_size: int | None, dtype: torch.dtype | None
) -> tuple[str, ExportedLayer] | None:
    """The exported layer of a plain float Linear (round-to-nearest when ``weights`` asks), or None: stays float."""
    if weights == "int4":
        if group_size is not None and module.in_features % group_size:
            raise ValueError(
                f"layer {name!r}: group_size={group_size} does not divide its input width {module.in_features}; "
                "allowed: a divisor of every selected layer's input width, or group_size=None (per channel)"
            )
        return f"int4 g{group_size or module.in_features} (RTN)", Int4Linear.from_module(module, group_size)
    if weights == "int8":
        if sparse:
            rtn = round_to_nearest(module.weight, 8)
            return "2:4 int8 (RTN)", SemiStructuredSparseLinear.from_quantized(rtn, module.bias, QuantizedInput(8))
        return "int8 (RTN)", Int8Linear.from_module(module)
    if sparse:
        return "2:4", SemiStructuredSparseLinear(module.weight.detach().to(dtype or module.weight.dtype), module.bias)
    return None


def plan_layers(
    model: nn.Module,
    weights: str | None,
    sparsity: str | None,
    targets: str | Sequence[str] | None,
    ignore: str | Sequence[str] | None,
    group_size: int | None = 128,
    dtype: torch.dtype | None = None,
) -> dict[str, tuple[str, ExportedLayer]]:
    """``{name: (layout, exported layer)}`` for the selected Linears; the model is not touched. Float 2:4 values are
    kept in ``dtype`` (the weight's own when None).

    Raises:
        ValueError: a layer that cannot be exported as asked (naming it), ``sparsity="2:4"`` on a layer that is
            not 2:4 sparse, or nothing to export at all.
    """
    done = [n for n, m in model.named_modules() if isinstance(m, ExportedLayer)]
    if done and not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(
            f"model is already exported ({len(done)} exported layers, e.g. {done[0]!r}) and has no Linear left; "
            "allowed: export_for_inference once, on the model as the callbacks left it"
        )
    accept = lambda m: isinstance(m, (nn.Linear, nn.Conv2d))  # noqa: E731
    selected = select_layers(model, targets, ignore, accept=accept, kind="Linear / Conv2d")
    plan: dict[str, tuple[str, ExportedLayer]] = {}
    for name, module in selected.items():
        if isinstance(module, nn.Conv2d):
            if (found := _conv_layer(name, module)) is not None:
                plan[name] = found
            continue
        if is_fake_quant(module) and module.weight_quantizer.method == "kmeans":
            raise ValueError(f"layer {name!r} holds k-means codes; allowed: linear quantization (no k-means kernel)")
        weight = module.fake_quantized_weight() if is_fake_quant(module) else module.weight
        sparse = sparsity is not None and module.in_features % 8 == 0 and is_24_sparse(weight.detach())
        if sparsity == "2:4" and not sparse:
            raise ValueError(f"sparsity='2:4' but layer {name!r} is not 2:4 sparse; allowed: 2:4-pruned layers")
        if is_fake_quant(module):
            plan[name] = _fake_quant_layer(name, module, sparse)
        elif (found := _float_layer(name, module, weights, sparse, group_size, dtype)) is not None:
            plan[name] = found
    if not plan:
        raise ValueError(
            f"nothing to export with weights={weights!r}, sparsity={sparsity!r}: the selected layers are plain float "
            "and not 2:4 sparse; allowed: weights='int8' or 'int4', or a model compressed by the callbacks"
        )
    return plan


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
    group_size: int | None = 128,
) -> nn.Module:
    """Replace the selected Linears of ``model`` (in place) by real int8 / int4 / 2:4 inference layers.

    Args:
        model: a model as the callbacks left it (fake-quant and/or pruned layers), or a plain float model.
        weights: ``"int8"`` (per-channel round-to-nearest, dynamic per-token int8 activations) or ``"int4"``
            (group-wise, weight-only) for plain float layers; None leaves them float. Fake-quant layers always
            keep their own codes and scales.
        sparsity: ``"auto"`` uses the 2:4 layout where a weight is 2:4 sparse, ``"2:4"`` requires it of every
            selected layer, None never uses it.
        targets, ignore: regexes over Linear / Conv2d layer names (as the callbacks take them).
        dtype: float dtype the rest of the model computes in afterwards (``torch.bfloat16`` on CPUs with bf16
            matrix units); None keeps it.
        prefer: ``"speed"`` (fastest verified kernel per layer), ``"memory"`` (fastest among those that hold no
            dense copy of the weight), ``"reference"`` (the slow reference paths, for checking).
        example_inputs: one batch of model inputs; each layer is then timed at the rows it really sees.
        tokens: rows to time layers at when ``example_inputs`` is None.
        group_size: int4 group size for plain float layers (a divisor of every selected layer's input width), or
            None for one scale per output channel.

    Returns:
        ``model`` itself, in eval mode, with ``model.export_report`` (:class:`ExportReport`).
    """
    check_choice("weights", weights, WEIGHTS), check_choice("sparsity", sparsity, SPARSITIES)
    check_choice("prefer", prefer, PREFERENCES)
    dtype = check_dtype(dtype)
    check_positive_int("tokens", tokens), check_positive_int("group_size", group_size, optional=True)
    with torch.no_grad():
        plan = plan_layers(model, weights, sparsity, targets, ignore, group_size, dtype)
        kept = kept_layers(model, exclude=plan)
    shapes = layer_input_shapes(model, list(plan), example_inputs) if example_inputs is not None else {}
    device = next(iter(model.parameters())).device
    replace_layers(model, kept)
    if dtype is not None:
        model.to(dtype)
    replace_layers(model, {name: layer.to(device) for name, (_, layer) in plan.items()})
    compute = dtype or float_dtype(model)
    report, timings = ExportReport(), {}
    with Progress(len(plan), "export self-check") as bar:
        for name, (layout, layer) in plan.items():
            record = choose_kernel(layer, tokens, compute, prefer, timings, shapes.get(name))
            record.name, record.layout = name, layout
            record.note = (record.note + kernel_note(layer, record)).strip("; ")
            report.layers.append(record)
            bar.step(f"{name}: {record.kernel}")
    model.eval()
    model.export_report = report
    log.info("export_for_inference:\n%s", report.to_markdown())
    return model


def kept_layers(model: nn.Module, exclude: dict[str, Any]) -> dict[str, nn.Module]:
    """The fake-quant layers that are not exported, as the float layers that replace them (the model is not
    touched): each holds its quantized weight as a float weight and, where it quantized its input, keeps that input
    quantization (:mod:`~lightning_compress.export.kept`), so the export computes what the compressed model did.

    Raises:
        ValueError: a layer whose input quantization a kept float layer cannot reproduce (naming it).
    """
    rest = {n: m for n, m in model.named_modules() if is_fake_quant(m) and n not in exclude}
    kept = {}
    for name, module in rest.items():
        q = module.fake_quantized_weight().detach()
        aq = module.act_quantizer
        if aq is not None and not module.enabled and getattr(aq, "smooth", None) is not None:
            raise ValueError(
                f"layer {name!r} is a disabled fake-quant layer with a SmoothQuant divisor that its weight absorbed; "
                "allowed: export it (name it in targets) or enable it"
            )
        act = aq.quantized() if aq is not None and module.enabled else None
        layer = module.to_module()
        layer.weight = nn.Parameter(q, requires_grad=False)
        kept[name] = layer if act is None else input_quantized(name, layer, act)
    if kept:
        log.warning(
            "not exported, kept as float layers with their quantized weights (and input quantization where they "
            "had it): %s",
            sorted(kept),
        )
    return kept
