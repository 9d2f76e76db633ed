"""compressed-tensors checkpoints: the Hugging Face model folders vLLM and transformers serve (llm-compressor's format).

``save_compressed(model, path, tokenizer)`` writes the model a quantization callback left (fake-quant layers) or
``export_for_inference`` made (``Int8Linear`` / ``Int4Linear``) as ``config.json`` with the ``quantization_config``
compressed-tensors defines, plus safetensors shards (``save_pretrained``). Each quantized Linear ``p`` becomes one
config group's scheme and, by the format compressed-tensors' own compressors choose for it:

- ``pack-quantized`` (weight-only, W4A16 / W8A16): ``p.weight_packed`` int32, ``p.weight_shape``, ``p.weight_scale``
  and, asymmetric, ``p.weight_zero_point`` (packed along the output dimension);
- ``int-quantized`` (W8A8): ``p.weight`` int8 and ``p.weight_scale``, with ``p.input_scale`` (and
  ``p.input_zero_point``) for static activations; dynamic ones are per token.

The codes written are exactly ours: the compressors re-round ``S · (q − Z)`` (formed in float32) to ``q``. Scales
are stored in the model's float dtype, as compressed-tensors does; in float32 the checkpoint is our weights bit for
bit. ``load_compressed(path)`` reads such a folder (ours or llm-compressor's) back into our export layers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.export.int4_linear import Int4Linear
from lightning_compress.export.int8_linear import Int8Linear
from lightning_compress.export.io import atomic_dir
from lightning_compress.export.kept import is_input_quantized
from lightning_compress.export.layer import ExportedLayer, ExportedLinear, float_dtype
from lightning_compress.nn.fake_quant import is_fake_quant
from lightning_compress.nn.quantized import QuantizedInput, QuantizedLayer, QuantizedWeight

log = logging.getLogger(__name__)

CONFIG = "config.json"
# Weight layouts compressed-tensors has a name for: (strategy, group_size) from a QuantizedWeight's scale shape.
STRATEGIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class CompressedLayer:
    """One quantized Linear as compressed-tensors sees it: its scheme's arguments and our codes.

    Attributes:
        name: the module's name in the model.
        weights: compressed-tensors ``QuantizationArgs`` of the weight.
        inputs: ``QuantizationArgs`` of the input activations, or None (weight-only).
        layer: our codes, scales and input quantization (None where only the scheme is kept: a streamed block's
            layers once the block is written).
        bias: the layer's bias, or None.
    """

    name: str
    weights: Any
    inputs: Any
    layer: QuantizedLayer | None
    bias: Tensor | None


INSTALL_HINT = "pip install 'lightning_compress[hf]' (compressed-tensors>=0.19)"


def require_compressed_tensors() -> None:
    """Raise ImportError with the install command when compressed-tensors is missing."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ImportError(
            f"compressed-tensors checkpoints need the compressed-tensors package: {INSTALL_HINT}"
        ) from None


# ------------------------------------------------------------------------------------------------ the scheme
def weight_args(name: str, weight: QuantizedWeight, in_features: int) -> Any:
    """compressed-tensors ``QuantizationArgs`` for ``weight`` of layer ``name`` (``in_features`` inputs per row).

    Per tensor (one scale), per channel (``(out, 1)`` or groups as wide as a row) or per group of ``g`` inputs
    (``(out, in / g)``); integer codes of 2..8 bits, symmetric or with integer zero-points, or FP8 E4M3 values
    (``type="float"``, compressed-tensors' ``float-quantized`` format).

    Raises:
        ValueError: a codebook weight, or one scale per column (GPTQ act-order groups without static groups),
            naming the layer and what compressed-tensors can hold.
    """
    from compressed_tensors.quantization import QuantizationArgs

    if weight.format == "codebook":
        raise ValueError(
            f"layer {name!r}: k-means codebook weights have no compressed-tensors scheme; allowed: integer or FP8 "
            "codes (QAT, GPTQ, AWQ, SmoothQuant, round-to-nearest)"
        )
    scale = weight.scale
    kind = "float" if weight.format == "fp8" else "int"
    common = {"num_bits": weight.bits, "type": kind, "symmetric": weight.symmetric}
    if scale.numel() == 1:
        return QuantizationArgs(**common, strategy="tensor")
    if scale.shape[-1] == 1 or weight.group_size == in_features:
        return QuantizationArgs(**common, strategy="channel")
    if weight.group_size is not None and scale.shape[-1] * weight.group_size == in_features:
        return QuantizationArgs(**common, strategy="group", group_size=weight.group_size)
    raise ValueError(
        f"layer {name!r}: scales of shape {tuple(scale.shape)} (one per column: GPTQ act-order groups taken during "
        "the solve) have no compressed-tensors layout; use GPTQFinalize(static_groups=True) for (out, in / group) "
        "scales"
    )


def input_args(name: str, quantized: QuantizedInput | None) -> Any:
    """compressed-tensors ``QuantizationArgs`` for a layer's input quantization (None when it has none).

    Dynamic symmetric per-token scales (``strategy="token", dynamic=True``) or one static scale (and zero-point);
    integer codes or FP8 (``type="float"``).

    Raises:
        ValueError: an explicit SmoothQuant divisor ``x / s`` (compressed-tensors has no per-input smoothing: fold it
            into the producer, ``SmoothQuantCalibrate(explicit_scales=False)``).
    """
    from compressed_tensors.quantization import QuantizationArgs

    if quantized is None:
        return None
    if quantized.smooth is not None:
        raise ValueError(
            f"layer {name!r} divides its input by an explicit SmoothQuant scale, which compressed-tensors cannot "
            "hold; use SmoothQuantCalibrate(explicit_scales=False) (folds into producers only) or save_exported"
        )
    kind = "float" if quantized.method == "fp8" else "int"
    if quantized.dynamic:
        return QuantizationArgs(num_bits=quantized.bits, type=kind, symmetric=True, strategy="token", dynamic=True)
    return QuantizationArgs(
        num_bits=quantized.bits, type=kind, symmetric=quantized.zero_point is None, strategy="tensor"
    )


def layer_quantization(name: str, module: nn.Module, fmt: str = "compressed-tensors") -> QuantizedLayer | None:
    """What ``module`` holds on a grid: a fake-quant layer's or an ``Int8Linear`` / ``Int4Linear``'s
    :class:`QuantizedLayer`; None for a float layer.

    Raises:
        ValueError: a quantized layer the serving format ``fmt`` cannot hold (a convolution, a 2:4 or input-only
            layer, a fake-quant layer that is switched off), naming it.
    """
    if isinstance(module, (Int8Linear, Int4Linear)):
        return module.quantized()
    if isinstance(module, ExportedLayer):
        raise ValueError(
            f"layer {name!r} is a {type(module).__name__}, which {fmt} cannot hold; save the model "
            "before export_for_inference, or with save_exported"
        )
    if not is_fake_quant(module):
        if is_input_quantized(module):
            raise ValueError(f"layer {name!r} quantizes its input only; {fmt} needs a quantized weight")
        return None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"layer {name!r} is a quantized {type(module).__name__}; {fmt} holds Linears")
    if not module.enabled:
        raise ValueError(f"layer {name!r} has fake quantization switched off; enable it or convert it first")
    return module.quantized()


def compressed_layers(model: nn.Module, require: bool = True) -> list[CompressedLayer]:
    """Every quantized Linear of ``model`` with its compressed-tensors arguments, all checked.

    Raises:
        ValueError: no quantized layer (with ``require``), or one compressed-tensors cannot hold (named).
    """
    out = []
    for name, module in model.named_modules():
        layer = layer_quantization(name, module)
        if layer is None:
            continue
        in_features = layer.weight.codes.shape[1]
        bias = getattr(module, "bias", None)
        out.append(
            CompressedLayer(name, weight_args(name, layer.weight, in_features), input_args(name, layer.input), layer,
                            None if bias is None else bias.detach())
        )  # fmt: skip
    if not out and require:
        raise ValueError("model has no quantized layers; run a quantization callback (QAT, GPTQ, AWQ, SmoothQuant)")
    return out


def quantization_config(model: nn.Module, layers: list[CompressedLayer]) -> Any:
    """The compressed-tensors ``QuantizationConfig``: one config group per distinct scheme, each with its format.

    One scheme targets ``["Linear"]`` and ignores the Linears left float (llm-compressor's layout, e.g.
    ``ignore: [lm_head]``); several schemes list their layers by name.
    """
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    groups: dict[tuple[str, str], list[str]] = {}
    args: dict[tuple[str, str], tuple[Any, Any]] = {}
    for layer in layers:
        key = (layer.weights.model_dump_json(), "" if layer.inputs is None else layer.inputs.model_dump_json())
        groups.setdefault(key, []).append(layer.name)
        args[key] = (layer.weights, layer.inputs)
    quantized = {layer.name for layer in layers}
    config_groups, formats = {}, set()
    for i, (key, names) in enumerate(groups.items()):
        targets = ["Linear"] if len(groups) == 1 else names
        scheme = QuantizationScheme(targets=targets, weights=args[key][0], input_activations=args[key][1])
        scheme.format = infer_module_format(nn.Linear, scheme)
        formats.add(scheme.format)
        config_groups[f"group_{i}"] = scheme
    ignore = []
    if len(groups) == 1:
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    return QuantizationConfig(
        config_groups=config_groups, format=fmt, ignore=ignore, quantization_status=QuantizationStatus.COMPRESSED
    )


# ------------------------------------------------------------------------------------------------ save
def layer_tensors(layer: CompressedLayer, scheme: Any, dtype: torch.dtype) -> dict[str, Tensor]:
    """The checkpoint tensors of one layer (local names: ``weight_packed``, ``weight_scale``, ...), made by the
    compressor of ``scheme.format`` from our codes; scales in ``dtype``."""
    from compressed_tensors.compressors import BaseCompressor

    w = layer.layer.weight
    scale = w.scale.float().reshape(-1, 1) if w.scale.numel() == 1 else w.scale.float()
    scale = scale.reshape(1) if w.scale.numel() == 1 else scale
    local = {"weight": w.dequantize(), "weight_scale": scale}
    if w.zero_point is not None:
        local["weight_zero_point"] = w.zero_point.reshape(scale.shape).to(torch.int8)
    inp = layer.layer.input
    if inp is not None and not inp.dynamic:
        local["input_scale"] = inp.scale.float().reshape(1)
        if inp.zero_point is not None:
            local["input_zero_point"] = inp.zero_point.reshape(1).to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    out = compressor.compress(local, scheme)
    for key in ("weight_scale", "input_scale"):
        if key in out:
            out[key] = out[key].to(dtype)
    if layer.bias is not None:
        out["bias"] = layer.bias.to(dtype)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def compressed_state_dict(model: nn.Module, layers: list[CompressedLayer], config: Any) -> dict[str, Tensor]:
    """``model``'s state dict with each quantized layer's tensors replaced by its compressed ones."""
    schemes = {}
    for scheme in config.config_groups.values():
        for layer in layers:
            if scheme.targets == ["Linear"] or layer.name in scheme.targets:
                schemes[layer.name] = scheme
    dtype = float_dtype(model)
    prefixes = tuple(f"{layer.name}." for layer in layers)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for layer in layers:
        tensors = layer_tensors(layer, schemes[layer.name], dtype)
        state.update({f"{layer.name}.{k}": v for k, v in tensors.items()})
    return state


def compressed_part(module: nn.Module, prefix: str) -> tuple[dict[str, Tensor], list[CompressedLayer]]:
    """What :func:`save_compressed` writes for one part of a model (a block, written as its own shard by a streamed
    calibration): ``module``'s checkpoint tensors with its quantized Linears compressed, keys under ``prefix``
    (e.g. ``"model.layers.3."``), and those layers (names under ``prefix``, without their codes) for the final
    :func:`quantization_config`."""
    layers = compressed_layers(module, require=False)
    config = quantization_config(module, layers) if layers else None
    state = compressed_state_dict(module, layers, config) if layers else module.state_dict()
    light = [CompressedLayer(f"{prefix}{c.name}", c.weights, c.inputs, None, None) for c in layers]
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in state.items()}, light


def save_compressed(
    model: nn.Module, path: str | Path, tokenizer: Any = None, max_shard_size: int | str = "5GB"
) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint folder that vLLM and transformers load.

    ``model`` is a transformers ``PreTrainedModel`` whose Linears a quantization callback left as fake-quant layers
    (QAT, GPTQ, AWQ, SmoothQuant, RTN) or ``export_for_inference`` made ``Int8Linear`` / ``Int4Linear``; other layers
    stay float and are listed in ``ignore``. Everything is checked before anything is written; the folder is
    written under a temporary name and renamed into place, so a crash leaves no half checkpoint. ``model`` is not
    changed.

    Args:
        model: the quantized transformers model.
        path: the folder to write (replaced if it exists).
        tokenizer: its tokenizer (or processor), saved alongside when given.
        max_shard_size: ``save_pretrained``'s shard size.

    Returns:
        ``path`` as a Path.

    Raises:
        TypeError: ``model`` is not a transformers model. ValueError: no quantized layer, or a layer the format
            cannot hold (named, with the reason).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not is_dequantized_on_load(quantizer):
        raise ValueError(
            f"model was loaded quantized by transformers ({type(quantizer).__name__}); load it in float to compress it"
        )
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise TypeError(
            f"model must be a transformers PreTrainedModel (compressed-tensors checkpoints are Hugging Face model "
            f"folders), got {type(model).__name__}; use save_exported for other models"
        )
    require_compressed_tensors()
    layers = compressed_layers(model)
    config = quantization_config(model, layers)
    state = compressed_state_dict(model, layers, config)

    def write(tmp: Path) -> None:
        from compressed_tensors.compressors import ModelCompressor

        with dequantized_load(model):
            model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        ModelCompressor(quantization_config=config).update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_dir(Path(path), write)


def is_dequantized_on_load(quantizer: Any) -> bool:
    """Whether a transformers ``hf_quantizer`` left float weights: a GGUF file is dequantized when it is loaded."""
    return type(quantizer).__name__ == "GgufHfQuantizer"


@contextmanager
def dequantized_load(model: nn.Module) -> Iterator[None]:
    """``model`` without the ``hf_quantizer`` of a GGUF load (its weights are float), restored on exit, so that
    ``save_pretrained`` writes them."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        yield
        return
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer


# ------------------------------------------------------------------------------------------------ load
def read_quantization_config(path: Path) -> tuple[dict[str, Any], Any]:
    """``(config.json as a dict, its compressed-tensors QuantizationConfig)``, validated.

    Raises:
        FileNotFoundError: no ``config.json``. ValueError: no compressed-tensors ``quantization_config``, or one
            whose layers are not stored compressed.
    """
    from compressed_tensors.quantization import QuantizationConfig

    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path / CONFIG} not found; allowed: a compressed-tensors model folder")
    config = json.loads((path / CONFIG).read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise ValueError(f"{path / CONFIG} has no compressed-tensors quantization_config (quant_method={method!r})")
    fields = set(QuantizationConfig.model_fields)
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in fields})
    if parsed.quantization_status != "compressed":
        raise ValueError(f"{path}: quantization_status is {parsed.quantization_status!r}; allowed: 'compressed'")
    return config, parsed


def checkpoint_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's safetensors shards (``model.safetensors`` or the shards its index lists)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = files or ["model.safetensors"]
    tensors: dict[str, Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} not found")
        tensors.update(load_file(path / f))
    return tensors


def matched_schemes(model: nn.Module, config: Any) -> Iterator[tuple[str, nn.Module, Any]]:
    """``(name, module, scheme)`` for every module a config group targets (compressed-tensors' own matching)."""
    from compressed_tensors.utils import match_named_modules

    for scheme in config.config_groups.values():
        for name, module in match_named_modules(model, scheme.targets, config.ignore):
            yield name, module, scheme


def loaded_layer(name: str, scheme: Any, local: dict[str, Tensor], bias: Tensor | None) -> ExportedLinear:
    """Our export layer for one compressed layer's tensors: ``Int4Linear`` for codes of 4 bits or fewer,
    ``Int8Linear`` for symmetric per-channel 8-bit codes.

    Raises:
        ValueError: a scheme neither layer takes (float weights, 5-8-bit groups or zero-points), naming the layer.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w, inp = scheme.weights, scheme.input_activations
    if w is not None and (w.type == "float" or (inp is not None and inp.type == "float")):
        raise ValueError(
            f"layer {name!r}: FP8 (float) weights or inputs have no export layer here (no FP8 kernel on CPU); load "
            "the folder with transformers (compressed-tensors decompresses it) or serve it with vLLM"
        )
    if w is None or w.type != "int" or (inp is not None and inp.type != "int"):
        raise ValueError(f"layer {name!r}: scheme {scheme.model_dump()} is not integer; no export layer takes it")
    scale = local["weight_scale"].float()
    if "weight_packed" in local:
        shape = torch.Size(local["weight_shape"].tolist())
        codes = unpack_from_int32(local["weight_packed"], w.num_bits, shape)
    else:
        codes = local["weight"]
    zero = local.get("weight_zero_point")
    if zero is not None and "weight_packed" in local and w.strategy in ("channel", "group"):
        zero = unpack_from_int32(zero, w.num_bits, torch.Size((codes.shape[0], scale.shape[-1])), packed_dim=0)
    zero = None if w.symmetric or zero is None else zero.float().reshape(scale.shape)
    group = w.group_size if w.strategy == "group" else None
    weight = QuantizedWeight(codes.to(torch.int8), scale, zero, w.num_bits, group)
    act = None
    if inp is not None:
        static = "input_scale" in local
        act = QuantizedInput(
            inp.num_bits,
            local["input_scale"].float().reshape(()) if static else None,
            local["input_zero_point"].float().reshape(()) if static and not inp.symmetric else None,
        )
    if w.num_bits <= 4 and act is None:
        return Int4Linear.from_quantized(weight, bias)
    if w.num_bits <= 8 and w.symmetric and w.strategy == "channel":
        return Int8Linear.from_quantized(weight, bias, act)
    raise ValueError(
        f"layer {name!r}: {w.num_bits}-bit {w.strategy} weights (symmetric={w.symmetric}) with inputs "
        f"{None if inp is None else inp.model_dump()} have no export layer; allowed: weight-only codes of at most "
        "4 bits, or symmetric per-channel 8-bit codes"
    )


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Read a compressed-tensors checkpoint folder (ours or llm-compressor's) into a transformers model whose
    quantized Linears are our ``Int4Linear`` / ``Int8Linear`` export layers (exact codes and scales).

    The model class is the config's ``architectures[0]``; every checkpoint tensor must be used and every model
    tensor found (tied weights re-tied), else nothing is returned.

    Args:
        path: the folder (``config.json`` and safetensors shards).
        dtype: the float dtype of the layers left float.

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        FileNotFoundError: files missing. ValueError: not compressed-tensors, a scheme no export layer takes, or
            tensors that do not fit the model (named).
    """
    require_compressed_tensors()
    import transformers
    from transformers.initialization import no_init_weights

    path = Path(path)
    raw, config = read_quantization_config(path)
    hf_config = transformers.AutoConfig.from_pretrained(path)
    del hf_config.quantization_config
    arch = (raw.get("architectures") or [None])[0]
    if not hasattr(transformers, str(arch)):
        raise ValueError(f"{path / CONFIG}: architectures={raw.get('architectures')!r} is not a transformers class")
    tensors = checkpoint_tensors(path)
    with no_init_weights():  # every tensor comes from the checkpoint: skip the random initialisation
        model = getattr(transformers, arch)._from_config(hf_config, dtype=dtype)
    new, used = loaded_layers(model, config, tensors)
    return _assemble(path, model, new, {k: v for k, v in tensors.items() if k not in used}, dtype)


def loaded_layers(
    model: nn.Module, config: Any, tensors: dict[str, Tensor]
) -> tuple[dict[str, ExportedLinear], set[str]]:
    """``({name: export layer}, the checkpoint keys they used)`` for every module the config's groups target.

    Raises:
        ValueError: a targeted layer whose tensors are missing from the checkpoint, or that no export layer takes.
    """
    from compressed_tensors.compressors import BaseCompressor

    new, used = {}, set()
    for name, _, scheme in matched_schemes(model, config):
        prefix = f"{name}."
        local = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        names = set(compressor.compression_param_names(scheme)) - (
            {"weight_zero_point"} if scheme.weights.symmetric else set()
        )
        missing = sorted(names - set(local))
        if missing:
            raise ValueError(f"layer {name!r}: the checkpoint lacks {missing}")
        bias = local.get("bias")
        new[name] = loaded_layer(name, scheme, local, None if bias is None else bias.float())
        used |= {prefix + k for k in local}
    return new, used


def _assemble(
    path: Path, model: nn.Module, new: dict[str, nn.Module], rest: dict[str, Tensor], dtype: torch.dtype
) -> nn.Module:
    """Swap ``new`` into ``model``, load ``rest`` into its float tensors, re-tie; raise if anything is missing."""
    from lightning_compress.nn.select import replace_layers

    replace_layers(model, new)
    prefixes = tuple(f"{n}." for n in new)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    unexpected = sorted(set(rest) - set(expected))
    missing = sorted(k for k in set(expected) - set(rest) if k not in tied)
    if unexpected or missing:
        raise ValueError(f"{path} does not fit the model: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for key, t in rest.items():
        if t.shape != expected[key].shape:
            raise ValueError(
                f"tensor {key!r} has shape {tuple(t.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in rest.items()}, strict=False)
    model.tie_weights()
    return model.eval()
