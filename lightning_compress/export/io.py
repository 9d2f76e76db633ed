"""Saving and loading exported models: ``model.safetensors`` and ``manifest.json``, no pickle.

``save_exported(model, path)`` writes ``path/model.safetensors`` and ``path/manifest.json`` (format version,
per-layer class, spec and kernel, tensor count and file size); ``load_exported(path, model)`` rebuilds the layers
into a freshly constructed plain model of the same architecture."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_compress.export.int4_linear import Int4Linear
from lightning_compress.export.int8_conv import Int8Conv2d
from lightning_compress.export.int8_linear import Int8Linear
from lightning_compress.export.kept import is_input_quantized, placeholder
from lightning_compress.export.layer import (
    FLOAT,
    REFERENCE,
    ExportedLayer,
    float_dtype,
    from_spec_dtype,
    to_spec_dtype,
)
from lightning_compress.export.sparse_linear import SemiStructuredSparseLinear
from lightning_compress.nn.select import replace_layers

log = logging.getLogger(__name__)


LAYER_CLASSES: dict[str, type[ExportedLayer]] = {
    c.__name__: c for c in (Int8Linear, Int4Linear, SemiStructuredSparseLinear, Int8Conv2d)
}


FORMAT = "lightning_compress.exported"


FORMAT_VERSION = 3  # 3: "inputs", kept float layers' input quantization; 2: per-tensor SHA-256 (1 loads, unverified)


MANIFEST, WEIGHTS_FILE = "manifest.json", "model.safetensors"


# ------------------------------------------------------------------------------------------------ save / load
def exported_layers(model: nn.Module) -> dict[str, ExportedLayer]:
    """``{name: layer}`` of the exported layers in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExportedLayer)}


def save_exported(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (after :func:`export_for_inference`) to the directory ``path``.

    ``model.safetensors`` holds every tensor of the state dict (tensors sharing storage, such as tied embeddings,
    are stored once and listed as aliases); ``manifest.json`` holds the format version, the float dtype, each
    exported layer's class, spec and kernel, the file size (to detect truncation) and a SHA-256 of every tensor's
    bytes (to detect corruption). Both files are written under temporary names and renamed into place, the
    manifest last, so a crash never leaves a directory that loads.

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
    atomic_file(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": to_spec_dtype(float_dtype(model)),
        "layers": {
            n: {"class": type(m).__name__, "spec": m.spec(), "kernel": m.kernel, "small_kernel": m.small_kernel}
            for n, m in layers.items()
        },
        "inputs": {n: m.input_spec() for n, m in model.named_modules() if is_input_quantized(m)},
        "aliases": aliases,
        "tensors": len(tensors),
        "file_bytes": (path / WEIGHTS_FILE).stat().st_size,
        "sha256": {key: tensor_digest(t) for key, t in tensors.items()},
    }
    atomic_file(path / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return path


def atomic_file(target: Path, write: Callable[[str], Any]) -> None:
    """``write(temporary path)`` next to ``target``, flush it to disk, then rename it onto ``target``: a crash or a
    full disk leaves the old file (or none), never a half-written one."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_dir(target: Path, write: Callable[[Path], Any]) -> Path:
    """``write(temporary folder)`` next to ``target``, then swap it in for ``target`` (replacing an existing folder).

    At every moment ``target`` is either the old complete folder or the new one (or, for an instant between the two
    renames, absent); a crash in ``write`` leaves ``target`` untouched and no temporary folder behind.

    Returns:
        ``target``.
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def tensor_digest(t: Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes in memory order (any dtype; the tensor is made contiguous on the CPU)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return hashlib.sha256(memoryview(data)).hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an exported directory, validated (format, version, file present and complete)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path / MANIFEST} not found; allowed: a directory written by save_exported")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / MANIFEST} is not valid JSON (truncated or corrupt): {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        manifest = manifest if isinstance(manifest, dict) else {}
        raise ValueError(f"{path / MANIFEST} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
    missing = [k for k in ("version", "dtype", "layers", "aliases", "file_bytes") if k not in manifest]
    if missing:
        raise ValueError(f"{path / MANIFEST} lacks {missing}: truncated or not written by save_exported")
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

    Everything is checked before ``model`` is touched: the manifest, every tensor's checksum, that each saved layer
    exists in ``model`` with its shapes, and that the model's state after the swap would have exactly the saved
    tensors' keys and shapes. An error leaves ``model`` as it was.

    Returns:
        ``model`` in eval mode, on ``device`` (the model's device when None).

    Raises:
        FileNotFoundError: files missing. ValueError: a corrupt, truncated or newer file, or one that does not fit
            ``model`` (naming the layer or tensor).
    """
    manifest = read_manifest(path)
    tensors = _read_tensors(Path(path), manifest)
    new = _rebuild_layers(Path(path), model, manifest)
    kept = _rebuild_inputs(model, manifest)
    _check_state(Path(path), model, {**new, **kept}, tensors)
    device = torch.device(device) if device is not None else next(iter(model.parameters())).device
    model.to(device=device, dtype=from_spec_dtype(manifest["dtype"]))
    replace_layers(model, {n: m.to(device) for n, m in {**new, **kept}.items()})
    model.load_state_dict(tensors, strict=True)
    for name, layer in new.items():
        entry = manifest["layers"][name]
        _restore_kernel(name, layer, entry["kernel"], entry.get("small_kernel"))
    return model.eval()


def _read_tensors(path: Path, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """The saved tensors, each verified against its manifest checksum, with the aliases filled in."""
    weights = path / WEIGHTS_FILE
    try:
        tensors = load_file(weights)
    except SafetensorError as err:
        raise ValueError(f"{weights} is corrupt or truncated: {err}") from None
    digests = manifest.get("sha256")
    if digests is None:
        log.warning("%s has no checksums (format version %s): integrity not verified", weights, manifest["version"])
    else:
        bad = sorted(k for k, t in tensors.items() if digests.get(k) != tensor_digest(t))
        if bad:
            raise ValueError(f"{weights}: tensors {bad[:5]} do not match their checksums: the file is corrupt")
    for key, source in manifest["aliases"].items():
        if source in tensors:
            tensors[key] = tensors[source]
    return tensors


def _rebuild_layers(path: Path, model: nn.Module, manifest: dict[str, Any]) -> dict[str, ExportedLayer]:
    """An empty exported layer per manifest entry, after checking that ``model`` has that layer with its shape."""
    new = {}
    for name, entry in manifest["layers"].items():
        if entry["class"] not in LAYER_CLASSES:
            raise ValueError(f"layer {name!r}: unknown class {entry['class']!r}; allowed: {sorted(LAYER_CLASSES)}")
        try:
            plain = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the manifest's layer {name!r} does not exist in {type(model).__name__}") from None
        layer = LAYER_CLASSES[entry["class"]].from_spec(entry["spec"])
        if not layer.fits(plain):
            saved = f"{layer.in_features} → {layer.out_features} ({layer.extra_repr()})"
            raise ValueError(f"layer {name!r} is {plain} in the model but {saved} in {path}")
        new[name] = layer
    return new


def _rebuild_inputs(model: nn.Module, manifest: dict[str, Any]) -> dict[str, nn.Module]:
    """The kept float layers with input quantization the manifest lists (placeholders until the state loads)."""
    kept = {}
    for name, spec in manifest.get("inputs", {}).items():
        try:
            plain = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the manifest's input-quantized layer {name!r} does not exist in the model") from None
        kept[name] = placeholder(name, plain, spec)
    return kept


def _check_state(path: Path, model: nn.Module, new: dict[str, nn.Module], tensors: dict[str, Tensor]) -> None:
    """Raise ValueError unless ``model`` with ``new`` swapped in would hold exactly ``tensors``' keys and shapes."""
    prefixes = tuple(f"{n}." for n in new)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    expected.update({f"{n}.{k}": v.shape for n, layer in new.items() for k, v in layer.state_dict().items()})
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing tensors {missing}, unexpected {unexpected}")
    for key, t in tensors.items():
        if t.shape != expected[key]:
            raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}, the model expects {tuple(expected[key])}")


def _restore_kernel(name: str, layer: ExportedLayer, kernel: str, small_kernel: str | None) -> None:
    available = layer.available_kernels()
    if kernel not in available:
        fast = [k for k in available if k not in (REFERENCE, FLOAT)]
        fallback = fast[0] if fast else FLOAT
        log.warning("layer %s: kernel %r is not available here; using %r", name, kernel, fallback)
        kernel = fallback
    if small_kernel is not None and small_kernel not in available:
        log.warning(
            "layer %s: small-rows kernel %r is not available here; using %r for all rows", name, small_kernel, kernel
        )
        small_kernel = None
    layer.set_kernel(kernel, small_kernel)
