"""Memory calculator: how many bytes a model's weights take in every format, what training with Adam needs, and
which GPUs hold them.

```bash
python -m lightning_compress.size --params 7e9                                   # by count: 7e9, 7B, 1.5M, 350m
python -m lightning_compress.size --model lightning_compress.examples.models:SmallCNN     # import, call, count
python -m lightning_compress.size --ckpt PATH/last.ckpt --gpus 24 48 80          # .ckpt / .pt / .safetensors
```

The numbers come from :mod:`lightning_compress.functional.size` (1 GB = 10^9 bytes). Torch is imported only to
read a model or a checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import math
import pickle
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from lightning_compress.functional.size import (
    fits,
    model_bytes,
    training_bytes,
    weight_format_bits,
    weight_table,
)

COUNT_SUFFIXES: dict[str, int] = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
COUNT_HELP = "a positive whole count like 7e9, 7000000000, 7B, 1.5M or 350m (suffixes K, M, B/G, T; any case)"
DEFAULT_GPUS: list[float] = [24, 40, 80]
STORED_AS: dict[str, str] = {
    "fp32": "32-bit floats",
    "fp16 / bf16": "16-bit floats",
    "int8": "8-bit codes (a)",
    "int4": "4-bit codes (a)",
    "int4 g128": "4-bit codes + one fp32 scale per 128 weights",
    "int3": "3-bit codes (a)",
    "int2": "2-bit codes (a)",
    "2:4 fp16": "2 of every 4 values in fp16 + 2-bit positions",
    "2:4 int8": "2 of every 4 values in int8 + 2-bit positions (a)",
}
_UNITS = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3)]
_SUFFIX_RE = re.compile(r"^(.*?)\s*([kmbgt]?)$", re.IGNORECASE)


def parse_count(text: str) -> float:
    """A parameter count from text: ``"7e9"``, ``"7000000000"``, ``"7B"``, ``"1.5M"``, ``"350m"`` -> 7e9 ... 3.5e8.

    Suffixes (any case): K = 10^3, M = 10^6, B or G = 10^9, T = 10^12. Computed in decimal, so ``"0.1B"`` is
    exactly 1e8. Raises ValueError unless the result is a positive whole number.
    """
    match = _SUFFIX_RE.match(str(text).strip())
    number, suffix = match.groups() if match else ("", "")
    try:
        value = Decimal(number) * COUNT_SUFFIXES[suffix.lower()]
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value <= 0 or value != value.to_integral_value():
        raise ValueError(f"params must be {COUNT_HELP}, got {text!r}")
    if float(value) == float("inf"):
        raise ValueError(f"params must be below {sys.float_info.max:.3g}, got {text!r}")
    return float(value)


def model_params(spec: str) -> int:
    """Parameters of the model built by ``spec`` = ``"dotted.module:Callable"``, called with no arguments.

    A name that is already a model (an object with ``.parameters()``, not a class) is counted as it is.
    Example: ``model_params("lightning_compress.examples.models:SmallCNN")`` is 38,282. Shared parameters count once.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model must look like 'dotted.module:Callable', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    is_model = hasattr(obj, "parameters") and not isinstance(obj, type)
    if not is_model and not callable(obj):
        raise ValueError(f"model {spec!r} must name a callable or a model, got {type(obj).__name__}")
    model = obj if is_model else obj()
    if not hasattr(model, "parameters"):
        raise ValueError(f"model {spec!r} must build an object with .parameters(), got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())


def checkpoint_params(path: str | Path, trust_pickle: bool = False) -> tuple[int, str]:
    """Parameters in a checkpoint and how they were read: ``(count, description)``.

    ``.safetensors``: read from the header only. A directory written by ``save_exported`` (or its
    ``model.safetensors``): each exported layer counts its ``in × out`` weights and bias from the manifest, not its
    stored codes, scales and positions. Otherwise ``torch.load(weights_only=True)`` of a Lightning checkpoint (its
    ``state_dict``) or a plain state dict; a file holding pickled objects beyond tensors is refused unless
    ``trust_pickle`` (unpickling can run code: only for files you trust). Parameters are the floating-point tensors:
    integer buffers and BatchNorm running statistics are not counted; tensors sharing storage (tied weights) count
    once.

    Raises:
        ValueError: a missing, truncated or corrupt file, or one without tensors (naming it).
    """
    from lightning_compress.export.io import MANIFEST  # imports torch: only when a checkpoint is read

    path = Path(path)
    exported = path if path.is_dir() else path.parent if (path.parent / MANIFEST).is_file() else None
    if exported is not None:
        return _exported_params(exported)
    if not path.is_file():
        raise ValueError(f"ckpt must be an existing file or an exported directory, got {str(path)!r}")
    if path.suffix == ".safetensors":
        count, skipped = _safetensors_params(path)
        return count, f"safetensors file, float tensors counted{_skipped(skipped)}"
    import torch

    note = "torch.load(weights_only=True)"
    try:
        obj = _load(path, weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ValueError(
                f"ckpt {str(path)!r} holds pickled objects beyond tensors; pass --trust-pickle to load it anyway "
                "(unpickling can run code: only for files you trust)"
            ) from None
        obj = _load(path, weights_only=False)
        note = (
            "torch.load(weights_only=False): the file holds pickled objects beyond tensors; load only files you trust"
        )
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    kind = "Lightning checkpoint state_dict" if state is not obj else "state dict"
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, Mapping) else {}
    if not tensors:
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"ckpt {str(path)!r} must hold a state dict of tensors (or a 'state_dict' key), got {keys}")
    params = [v for k, v in tensors.items() if _is_parameter(k, v.dtype.is_floating_point)]
    return _distinct_numel(params), f"{kind}, {len(params)} tensors{_skipped(len(tensors) - len(params))}, {note}"


# Tensors of a state dict that are buffers, not parameters: BatchNorm's running statistics (integers never count).
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _is_parameter(key: str, floating: bool) -> bool:
    """Whether a state-dict entry counts as a parameter: a float tensor that is not a BatchNorm statistic."""
    return floating and not key.endswith(BUFFER_SUFFIXES)


def _skipped(n: int) -> str:
    return f" ({n} buffers not counted: integer tensors and BatchNorm statistics)" if n else ""


def _load(path: Path, weights_only: bool) -> Any:
    """``torch.load`` on the CPU; ValueError naming the file when it is truncated or corrupt."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"ckpt {str(path)!r} is truncated or corrupt: {err}") from None


def _safetensors_params(path: Path) -> tuple[int, int]:
    """``(parameters, buffers skipped)`` of a safetensors file, from its header (shapes and dtypes) only."""
    from safetensors import SafetensorError, safe_open

    total, skipped = 0, 0
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                tensor = f.get_slice(name)
                if _is_parameter(name, tensor.get_dtype() in FLOAT_DTYPES):
                    total += _prod(tensor.get_shape())
                else:
                    skipped += 1
    except SafetensorError as err:
        raise ValueError(f"ckpt {str(path)!r} is truncated or corrupt: {err}") from None
    return total, skipped


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # safetensors' names of float dtypes


def _exported_params(path: Path) -> tuple[int, str]:
    """Parameters of an exported model directory: its layers' logical weights from the manifest, the rest's float
    tensors from the file."""
    from safetensors import safe_open

    from lightning_compress.export.io import WEIGHTS_FILE, read_manifest

    manifest = read_manifest(path)
    layers = manifest["layers"]
    count = sum(s["in_features"] * s["out_features"] + (s["out_features"] if s.get("bias") else 0)
                for s in (entry["spec"] for entry in layers.values()))  # fmt: skip
    prefixes = tuple(f"{name}." for name in layers)
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            tensor = f.get_slice(name)
            if not name.startswith(prefixes) and _is_parameter(name, tensor.get_dtype() in FLOAT_DTYPES):
                count += _prod(tensor.get_shape())
    return count, f"exported model, {len(layers)} exported layers counted at their logical shapes"


def _distinct_numel(tensors: Iterable[Any]) -> int:
    """Total elements, counting tensors that are the same view of the same storage (tied weights) once."""
    seen: set[tuple] = set()
    total = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride())
        if ptr and key in seen:
            continue
        seen.add(key)
        total += t.numel()
    return total


def _prod(shape: Sequence[int]) -> int:
    """Product of a shape (1 for a scalar)."""
    n = 1
    for d in shape:
        n *= d
    return n


def render_report(num_params: float, gpus: Sequence[float] = DEFAULT_GPUS, source: str | None = None) -> str:
    """The whole markdown report: weights per format, training memory, and which GPUs hold each."""
    unit, scale = _unit(model_bytes(num_params, "fp32"))
    lines = [f"# Memory for {num_params:,.0f} parameters ({_short_count(num_params)})", ""]
    if source:
        lines += [f"Counted from {source}.", ""]
    lines += _weights_section(num_params, unit, scale)
    lines += _training_section(num_params, unit, scale)
    lines += _fits_section(num_params, gpus, unit, scale)
    return "\n".join(lines)


def _weights_section(num_params: float, unit: str, scale: float) -> list[str]:
    """Markdown table of the weights' bytes in every format, with bits per weight and the ratio against FP32."""
    lines = [f"## Weights (1 {unit} = 10^{round(math.log10(scale))} bytes)", ""]
    lines += [f"| format | bits / weight | {unit} | vs FP32 | stored as |", "|---|---:|---:|---:|---|"]
    for name, nbytes in weight_table(num_params):
        bits = weight_format_bits(name)
        lines.append(f"| {name} | {bits:g} | {nbytes / scale:.2f} | {32 / bits:.2f}x | {STORED_AS[name]} |")
    lines += [
        "",
        "(a) Codes only: per-tensor or per-row scales are not counted (no shapes are known from a count); one fp32",
        "scale per row of 4096 inputs would add 32 / 4096 = 0.008 bits per weight.",
        "",
    ]
    return lines


def _training_section(num_params: float, unit: str, scale: float) -> list[str]:
    """Markdown table of weights-only inference and Adam training memory; activations excluded."""
    rows = [
        ("inference, bf16 / fp16 weights only", model_bytes(num_params, "bf16")),
        ("Adam, fp32: 4 weights + 4 grads + 8 moments", training_bytes(num_params, "adam", "fp32")),
        (
            "Adam, mixed precision: 2 bf16 weights + 2 bf16 grads + 4 fp32 master + 8 fp32 moments",
            training_bytes(num_params, "adam", "mixed"),
        ),
    ]
    lines = ["## Training and inference (activations NOT included)", ""]
    lines += [f"| setup | bytes / param | {unit} |", "|---|---:|---:|"]
    lines += [f"| {name} | {nbytes / num_params:g} | {nbytes / scale:.2f} |" for name, nbytes in rows]
    lines += [
        "",
        "Mixed precision with fp32 master weights takes the same 16 bytes per parameter as FP32 (it saves time and",
        "activation memory, not weight memory); Lightning's `precision='bf16-mixed'` keeps fp32 weights and grads:",
        "4 + 4 + 8, also 16. Activations, KV cache, temporary buffers and the CUDA context come on top.",
        "",
    ]
    return lines


def _fits_section(num_params: float, gpus: Sequence[float], unit: str, scale: float) -> list[str]:
    """One line per format (and Adam training): which of the GPU sizes hold it."""
    sizes = ", ".join(f"{g:g}" for g in gpus)
    rows = [*weight_table(num_params), ("Adam training, fp32 or mixed", training_bytes(num_params, "adam"))]
    lines = [f"## Fits on one GPU of {sizes} GB (weights only unless stated; nothing reserved)", ""]
    for name, nbytes in rows:
        held = fits(nbytes, list(gpus))
        where = ", ".join(f"{g:g} GB" for g in held) if held else f"none (needs more than {max(gpus):g} GB)"
        lines.append(f"- {name} ({nbytes / scale:.2f} {unit}): {where}")
    lines += ["", "GPU sizes are taken as N x 10^9 bytes; a card sold as N GB holds N GiB, a little more."]
    return lines


def _unit(num_bytes: float) -> tuple[str, float]:
    """The largest of GB / MB / KB that ``num_bytes`` reaches (KB below that)."""
    return next(((u, s) for u, s in _UNITS if num_bytes >= s), _UNITS[-1])


def _short_count(n: float) -> str:
    """``7e9 -> "7B"``, ``1.5e6 -> "1.5M"``, ``38282 -> "38.28K"``."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:g}"


def _count_arg(text: str) -> float:
    """argparse type for ``--params``: :func:`parse_count` with an argparse error."""
    try:
        return parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _gpu_arg(text: str) -> float:
    """argparse type for ``--gpus``: a positive size in GB."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"gpus must be positive sizes in GB like 24 40 80, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The CLI: exactly one of ``--params`` / ``--model`` / ``--ckpt``, plus ``--gpus``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_compress.size",
        description="Bytes of a model's weights in every format, Adam training memory, and which GPUs hold them.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", type=_count_arg, help=f"parameter count: {COUNT_HELP}")
    source.add_argument("--model", help="'dotted.module:Callable' building the model with no arguments")
    source.add_argument("--ckpt", help="Lightning .ckpt, torch state dict (.pt/.pth) or .safetensors file")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="let --ckpt unpickle objects beyond tensors (trusted files only)"
    )
    parser.add_argument(
        "--gpus", type=_gpu_arg, nargs="+", default=DEFAULT_GPUS, help="GPU memory sizes in GB (default 24 40 80)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the calculator on ``argv`` (default ``sys.argv[1:]``), print the markdown report, return 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    source = None
    try:
        if args.model:
            num_params, source = float(model_params(args.model)), f"`{args.model}()`"
        elif args.ckpt:
            count, how = checkpoint_params(args.ckpt, args.trust_pickle)
            num_params, source = float(count), f"{args.ckpt} ({how})"
        else:
            num_params = args.params
    except (ValueError, ImportError, AttributeError, OSError, RuntimeError, TypeError) as exc:
        parser.error(f"argument {'--model' if args.model else '--ckpt'}: {type(exc).__name__}: {exc}")
    if num_params <= 0:
        parser.error(f"the model or checkpoint has no parameters, got {num_params:g}")
    print(render_report(num_params, args.gpus, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
