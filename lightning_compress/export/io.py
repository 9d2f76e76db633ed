"""Saving and loading exported models: ``model.safetensors`` and ``manifest.json``, no pickle.

``save_exported(model, path)`` writes ``path/model.safetensors`` and ``path/manifest.json`` (format version,
per-layer class, spec and kernel, tensor count and file size); ``load_exported(path, model)`` rebuilds the layers
into a freshly constructed plain model of the same architecture."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_compress.export.int4_linear import Int4Linear
from lightning_compress.export.int8_linear import Int8Linear
from lightning_compress.export.layer import (
    FLOAT,
    REFERENCE,
    ExportedLinear,
    float_dtype,
    from_spec_dtype,
    to_spec_dtype,
)
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.nn.select import replace_layers

log = logging.getLogger(__name__)


LAYER_CLASSES: dict[str, type[ExportedLinear]] = {
    c.__name__: c for c in (Int8Linear, Int4Linear, SemiStructuredSparseLinear)
}


FORMAT = "lightning_compress.exported"


FORMAT_VERSION = 1


MANIFEST, WEIGHTS_FILE = "manifest.json", "model.safetensors"


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
        "dtype": to_spec_dtype(float_dtype(model)),
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
