"""Calibrating a model bigger than memory: its weights stay on disk and are streamed in one block at a time.

:func:`calibrate_streamed` builds the model on the ``meta`` device (accelerate's ``init_empty_weights``: no weight
memory), then runs a post-training callback (GPTQ, or any other on the calibration engine's block walk) with a
:class:`StreamedBlocks` in charge of the walk's blocks (:func:`~lightning_compress.calibration.engine.streaming`):

1. the tensors outside the block stack (embeddings, final norm, head) are read for as long as block 0's inputs are
   captured, then freed;
2. before each block is calibrated its weights are read from the checkpoint's safetensors shards (``safe_open``,
   only that block's tensors);
3. once the block has produced the next block's inputs, it is written compressed (compressed-tensors, one shard per
   block) and freed. Peak memory is one block's weights, the calibration activations and the embeddings, whatever
   the depth.

With ``checkpoint_dir`` every finished block is committed atomically: its shard, the next block's inputs (per
rank), then ``manifest.json`` (the commit point). Running the same call again after a crash (even a SIGKILL)
continues after the last committed block and writes the same folder an uninterrupted run writes; a checkpoint of
another model, recipe, calibration set or world size is refused, naming what differs. The output folder appears
only complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.calibration.batches import Inputs, call_args
from lightning_compress.calibration.capture import capture_inputs, replace_hidden
from lightning_compress.calibration.engine import streaming
from lightning_compress.nn.distributed import is_distributed, is_rank_zero

log = logging.getLogger(__name__)

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TASKS = {"causal_lm": "AutoModelForCausalLM", "base": "AutoModel"}


# ------------------------------------------------------------------------------------------------ the checkpoint
class SafetensorsCheckpoint:
    """The tensors of a Hugging Face model folder (``config.json`` and safetensors shards: ``model.safetensors``, or
    those ``model.safetensors.index.json`` lists), read lazily: opening reads and checks every shard's header only.

    Raises:
        FileNotFoundError: no such folder, no ``config.json``, no shard, or a shard the index names is missing.
        ValueError: a shard that is truncated or not safetensors, or one that lacks a tensor the index puts in it
            (each naming the file).
    """

    def __init__(self, folder: str | Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir() or not (self.folder / CONFIG).is_file():
            raise FileNotFoundError(
                f"{self.folder} is not a Hugging Face model folder (no {CONFIG}); allowed: a folder with config.json "
                "and safetensors shards (model.save_pretrained writes one)"
            )
        index = self.folder / INDEX
        listed: dict[str, str] = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
        files = sorted(set(listed.values())) or sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.folder} holds no safetensors shard (*.safetensors); allowed: safetensors")
        self.where: dict[str, str] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {index.name} but missing")
            try:
                with safe_open(path, "pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                        piece = handle.get_slice(key)
                        self.where[key] = name
                        self.meta[key] = (str(piece.get_dtype()), tuple(piece.get_shape()))
            except SafetensorError as err:
                raise ValueError(
                    f"{path} is not a complete safetensors file ({err}); re-save or re-download it"
                ) from err
        for key, name in listed.items():
            if self.where.get(key) != name:
                raise ValueError(f"{self.folder / name} lacks tensor {key!r}, which {index.name} puts there")

    def read(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The tensors ``names`` (each read from its shard, each shard opened once)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for name, keys in by_file.items():
            with safe_open(self.folder / name, "pt") as handle:
                out.update({k: handle.get_tensor(k) for k in keys})
        return out

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model: ``config.json``'s digest, and every tensor's name, dtype and shape."""
        listing = json.dumps(sorted((k, *v) for k, v in self.meta.items()))
        return {
            "config": hashlib.sha256((self.folder / CONFIG).read_bytes()).hexdigest(),
            "tensors": hashlib.sha256(listing.encode()).hexdigest(),
        }


def empty_model(folder: str | Path, task: str = "causal_lm") -> nn.Module:
    """The transformers model of ``folder``'s ``config.json`` with every parameter on the ``meta`` device (no memory)
    and its buffers real (rotary frequencies), its head tied as the config says, in eval mode; ``task``
    ``"causal_lm"`` or ``"base"``."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported for streamed calibration; allowed: {list(TASKS)}")
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = getattr(transformers, TASKS[task]).from_config(config)
    model.tie_weights()  # from_pretrained ties after loading; an empty model must be tied here
    return model.eval()


def tied_names(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for parameters that are the same object as an earlier one (a tied head)."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def check_checkpoint(model: nn.Module, checkpoint: SafetensorsCheckpoint) -> None:
    """Raise ValueError unless ``checkpoint`` holds exactly ``model``'s parameters, with their shapes: a missing
    tensor, one of another shape, or one ``model`` does not have (shards of another model), naming the file."""
    tied = tied_names(model)
    params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False) if n not in tied}
    for name, shape in params.items():
        if name not in checkpoint.meta:
            raise ValueError(
                f"{checkpoint.folder} lacks tensor {name!r} {shape} of {type(model).__name__}; allowed: a complete "
                "checkpoint of the model config.json describes"
            )
        if checkpoint.meta[name][1] != shape:
            raise ValueError(
                f"{checkpoint.folder / checkpoint.where[name]}: tensor {name!r} has shape {checkpoint.meta[name][1]}, "
                f"the model's is {shape}: shards of another model?"
            )
    buffers = {n for n, _ in model.named_buffers()}
    extra = [n for n in checkpoint.meta if n not in params and n not in tied and n not in buffers]
    if extra:
        raise ValueError(
            f"{checkpoint.folder / checkpoint.where[extra[0]]} holds tensors {extra[:5]} that "
            f"{type(model).__name__} (config.json) does not have: shards of another model?"
        )


def assign(model: nn.Module, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> None:
    """Put ``tensors`` (``{name in model: value}``) into ``model`` in place of its meta tensors, as ``dtype``."""
    for name, value in tensors.items():
        parent, _, attr = name.rpartition(".")
        module = model.get_submodule(parent)
        value = value.to(dtype) if value.is_floating_point() else value
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value


def to_meta(modules: Sequence[nn.Module]) -> None:
    """Free every parameter and buffer of ``modules`` (recursively) that is not on the meta device already."""
    for root in modules:
        for module in root.modules():
            for attr, p in list(module._parameters.items()):
                if p is not None and not p.is_meta:
                    module._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for attr, b in list(module._buffers.items()):
                if b is not None and not b.is_meta and attr in module.state_dict(keep_vars=True):
                    module._buffers[attr] = torch.empty_like(b, device="meta")


# ------------------------------------------------------------------------------------------------ atomic writes
def save_atomic(tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` ``save_file`` through :func:`~lightning_compress.export.io.atomic_file` (never part of a
    file)."""
    from safetensors.torch import save_file

    from lightning_compress.export.io import atomic_file

    atomic_file(path, lambda tmp: save_file(dict(tensors), tmp, metadata=metadata))


def write_json_atomic(data: Any, path: Path) -> None:
    """``data`` as JSON at ``path``, through :func:`~lightning_compress.export.io.atomic_file`."""
    from lightning_compress.export.io import atomic_file

    atomic_file(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


# ------------------------------------------------------------------------------------------------ fingerprints
def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


# Attributes of a callback that are results or data, not its configuration.
NOT_RECIPE = frozenset({"quantized", "masks", "groups", "exported", "calibration_data", "input_fn"})


def recipe(callback: Any) -> dict[str, Any]:
    """A callback's configuration as plain JSON values: its class and its settings (not its results)."""
    settings = {k: _plain(v) for k, v in sorted(vars(callback).items()) if k not in NOT_RECIPE and k[0] != "_"}
    return {"class": f"{type(callback).__module__}.{type(callback).__qualname__}", **settings}


def batches_digest(batches: Sequence[Any]) -> str:
    """SHA-256 over every tensor of the calibration batches (model inputs), in order."""
    from lightning_compress.export.io import tensor_digest

    h = hashlib.sha256()
    for batch in batches:
        args, kwargs = call_args(batch)
        for key, value in [*enumerate(args), *sorted(kwargs.items())]:
            if isinstance(value, Tensor):
                h.update(f"{key}:{tensor_digest(value)};".encode())
    return h.hexdigest()


def differences(old: Mapping[str, Any], new: Mapping[str, Any], path: str = "") -> list[str]:
    """``"key: was A, now B"`` for every leaf that differs between two fingerprints."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, f"{path}{key}.")
        elif a != b:
            out.append(f"{path}{key}: was {a!r}, now {b!r}")
    return out


# ------------------------------------------------------------------------------------------------ the stream
def _rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def _barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


class StreamedBlocks:
    """The :class:`~lightning_compress.calibration.engine.BlockStream` of :func:`calibrate_streamed`: reads each
    block from ``checkpoint``, writes it compressed into ``stage`` (one shard per block) and commits the progress.

    Args:
        model: the empty (meta) model.
        checkpoint: its weights on disk.
        callback: the post-training callback being run (its per-layer results of a written block are dropped).
        stage: where the shards, the next-block inputs and ``manifest.json`` go (the ``checkpoint_dir``).
        identity: the run's fingerprint (model, recipe, calibration digests, world size).
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoint: SafetensorsCheckpoint,
        callback: Any,
        stage: Path,
        identity: dict[str, Any],
    ) -> None:
        self.model, self.checkpoint, self.callback, self.stage = model, checkpoint, callback, stage
        self.identity = identity
        self.dtype = next(iter(model.parameters())).dtype
        self.tied = tied_names(model)
        self.manifest = self._resume()
        self.prefix = ""
        self.total = 0

    # -------------------------------------------------------------------------------------------- progress
    def _resume(self) -> dict[str, Any]:
        """The manifest of a run to continue (checked against this run's identity), or a fresh one."""
        path = self.stage / MANIFEST
        if not path.is_file():
            return {"version": MANIFEST_VERSION, **self.identity, "finished": -1, "layers": {}}
        saved = json.loads(path.read_text())
        diff = differences({k: saved.get(k) for k in self.identity}, self.identity)
        if saved.get("version") != MANIFEST_VERSION or diff:
            raise ValueError(
                f"checkpoint_dir {self.stage} holds a calibration of another run ({'; '.join(diff) or 'old format'}); "
                "allowed: the same model, recipe, calibration batches and world size, or an empty checkpoint_dir"
            )
        return saved

    def start(self) -> int:
        """The first block still to calibrate."""
        return int(self.manifest["finished"]) + 1

    def shard_name(self, index: int) -> str:
        """The shard file of block ``index`` (the last shard, ``index = total - 1``, holds the rest of the model)."""
        return f"model-{index + 1:05d}-of-{self.total:05d}.safetensors"

    def _inputs_path(self, index: int) -> Path:
        return self.stage / f"inputs-{index:05d}-rank{_rank()}.safetensors"

    # -------------------------------------------------------------------------------------------- BlockStream
    def _outside(self) -> list[str]:
        return [n for n in self.checkpoint.meta if not n.startswith(f"{self.prefix}.")]

    def check(self, model: nn.Module, batch: Any) -> None:
        """Run ``model`` on ``batch`` up to its first block (what a streamed model can run before the walk)."""
        from lightning_compress.calibration.capture import find_blocks

        found = find_blocks(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
        if found is None:
            raise ValueError(f"{type(model).__name__} has no repeated block stack; streamed calibration needs one")
        self.prefix = found[0]
        self.capture(model, found[0], found[1], [batch], resume=False)

    def capture(
        self, model: nn.Module, prefix: str, blocks: nn.ModuleList, batches: Sequence[Any], resume: bool = True
    ) -> list[Inputs]:
        """The inputs of the first block to calibrate: block 0's from the model's head (embeddings read for this,
        then freed), with the hidden states of the last committed block's outputs on resume."""
        self.prefix, self.total = prefix, len(blocks) + 1
        outside = self._outside()
        assign(model, self.checkpoint.read(outside), self.dtype)
        for name, first in self.tied.items():
            assign(model, {name: model.get_parameter(first)}, self.dtype)
        try:
            inputs = capture_inputs(model, blocks[0], batches)
        finally:
            to_meta([m for n, m in model.named_modules() if n and not (n.startswith(prefix) or prefix.startswith(n))])
        if resume and self.start() > 0:
            from safetensors.torch import load_file

            path = self._inputs_path(self.start() - 1)
            if not path.is_file():
                raise FileNotFoundError(f"{path} (the inputs of block {self.start()}) is missing; start afresh")
            saved = load_file(path)
            if len(saved) != len(inputs):
                raise ValueError(f"{path} holds {len(saved)} batches' inputs, this run has {len(inputs)}")
            inputs = [replace_hidden(a, saved[f"hidden.{j}"]) for j, a in enumerate(inputs)]
            log.info("streamed calibration: resuming at block %d of %d", self.start(), len(blocks))
        return inputs

    def load(self, index: int, block: nn.Module) -> None:
        """Read block ``index``'s tensors into ``block``."""
        head = f"{self.prefix}.{index}."
        names = [n for n in self.checkpoint.meta if n.startswith(head)]
        tensors = self.checkpoint.read(names)
        assign(block, {n[len(head) :]: t for n, t in tensors.items()}, self.dtype)

    def release(self, index: int, block: nn.Module, layers: Mapping[str, nn.Module], inputs: list[Inputs]) -> None:
        """Write block ``index`` compressed, commit it with the next block's inputs, then free it."""
        from lightning_compress.export.compressed import compressed_part

        head = f"{self.prefix}.{index}."
        state, compressed = compressed_part(block, head)
        if is_rank_zero():
            save_atomic(state, self.stage / self.shard_name(index))
        hidden = {f"hidden.{j}": (args[0] if args else kwargs["hidden_states"]).contiguous()
                  for j, (args, kwargs) in enumerate(inputs)}  # fmt: skip
        save_atomic(hidden, self._inputs_path(index))
        _barrier()
        self.manifest["finished"] = index
        self.manifest["layers"].update(
            {c.name: [c.weights.model_dump_json(), None if c.inputs is None else c.inputs.model_dump_json()]
             for c in compressed}
        )  # fmt: skip
        if is_rank_zero():
            write_json_atomic(self.manifest, self.stage / MANIFEST)
        _barrier()
        self._inputs_path(index - 1).unlink(missing_ok=True)
        for results in (self.callback.quantized, getattr(self.callback, "masks", {})):  # written: not kept
            for name in [n for n in results if n.startswith(head)]:
                del results[name]
        to_meta([block, *layers.values()])
        release_freed_memory()

    # -------------------------------------------------------------------------------------------- the folder
    def write(self, output: Path) -> Path:
        """Assemble the finished folder at ``output`` (compressed-tensors: ``config.json`` with the quantization
        config, the block shards, the rest of the model, the index, the tokenizer files of the source). A run that
        quantized nothing (a pruner alone) writes the plain Hugging Face folder of the pruned weights."""
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationArgs

        from lightning_compress.export.compressed import CompressedLayer, quantization_config
        from lightning_compress.export.io import atomic_dir

        layers = [
            CompressedLayer(name, QuantizationArgs.model_validate_json(w),
                            None if i is None else QuantizationArgs.model_validate_json(i), None, None)
            for name, (w, i) in self.manifest["layers"].items()
        ]  # fmt: skip
        config = quantization_config(self.model, layers) if layers else None  # None: pruned only, plain weights
        rest = self.checkpoint.read([n for n in self._outside() if n not in self.tied])
        rest = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in rest.items()}
        last = self.total - 1

        def fill(tmp: Path) -> None:
            weight_map = {}
            for index in range(last):
                name = self.shard_name(index)
                _link_or_copy(self.stage / name, tmp / name)
                from safetensors import safe_open

                with safe_open(tmp / name, "pt") as handle:
                    weight_map.update({k: name for k in handle.keys()})  # noqa: SIM118
            save_atomic(rest, tmp / self.shard_name(last), {"format": "pt"})
            weight_map.update({k: self.shard_name(last) for k in rest})
            write_json_atomic({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, tmp / INDEX)
            for path in self.checkpoint.folder.iterdir():
                if path.is_file() and path.suffix != ".safetensors" and path.name != INDEX:
                    shutil.copy2(path, tmp / path.name)
            if config is not None:
                ModelCompressor(quantization_config=config).update_config(str(tmp))

        return atomic_dir(output, fill)

    def clean(self) -> None:
        """Remove what this run committed to the stage folder (after the output is written)."""
        for path in [self.stage / MANIFEST, *self.stage.glob("model-*.safetensors"), *self.stage.glob("inputs-*")]:
            path.unlink(missing_ok=True)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere). Without it a block's freed
    tensors stay in glibc's arenas (its mmap threshold rises after the first large free): on the 1.5 GB benchmark
    model the streamed peak was 1980 MB without it, 1466 MB with it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------------------------ the driver
def calibrate_streamed(
    callback: Any,
    pretrained: str | Path,
    batches: Sequence[Any],
    output: str | Path,
    checkpoint_dir: str | Path | None = None,
    task: str = "causal_lm",
) -> Path:
    """Run a post-training ``callback`` (e.g. ``GPTQFinalize(bits=4)``) on the model in folder ``pretrained`` without
    loading it: block by block from its safetensors shards, each block written compressed as soon as it is done.

    The result is the compressed-tensors folder ``output`` (one shard per block, plus the rest of the model, the
    config with its ``quantization_config`` and the source's tokenizer files) that transformers and vLLM load and
    :func:`~lightning_compress.export.compressed.load_compressed` reads; its tensors are those
    :func:`~lightning_compress.export.compressed.save_compressed` writes after ``callback.apply`` on the model in
    memory. Under DDP (``torch.distributed`` initialised) each rank passes its own share of the batches; statistics
    are all-reduced as in memory and rank 0 writes.

    Args:
        callback: a post-training callback; every one runs on the calibration engine's block walk: GPTQ, AWQ,
            SmoothQuant (``explicit_scales=False``), SparseGPT, Wanda (a pruner without ``bits`` writes plain weights).
        pretrained: a Hugging Face model folder: ``config.json`` and safetensors shards.
        batches: calibration model inputs (e.g. tokenizer outputs), as for ``callback.apply``.
        output: the folder to write (replaced when the run completes).
        checkpoint_dir: where finished blocks are committed, so that re-running after a crash resumes; None keeps
            them in a temporary folder next to ``output``, removed afterwards.
        task: ``"causal_lm"`` (``AutoModelForCausalLM``) or ``"base"`` (``AutoModel``).

    Returns:
        ``output`` as a Path.

    Raises:
        TypeError: a callback without ``apply`` or ``quantized``. FileNotFoundError / ValueError: a folder that is not
            a complete, matching checkpoint (naming the file), or a ``checkpoint_dir`` of another run (naming what
            differs), all before anything is written.
    """
    if not callable(getattr(callback, "apply", None)) or not isinstance(getattr(callback, "quantized", None), dict):
        raise TypeError(
            f"callback must be a post-training calibration callback (GPTQFinalize, SmoothQuantCalibrate, AWQCalibrate, "
            f"SparseGPTPrune, WandaPrune), got {type(callback).__name__}"
        )
    if getattr(callback, "explicit_scales", False) and getattr(callback, "alpha", None) is not None:
        raise ValueError(
            "SmoothQuantCalibrate(explicit_scales=True) keeps explicit x / s divisors, which compressed-tensors "
            "cannot hold; allowed for a streamed run: explicit_scales=False (smoothing folded into producers only)"
        )
    output = Path(output)
    checkpoint = SafetensorsCheckpoint(pretrained)
    model = empty_model(pretrained, task)
    check_checkpoint(model, checkpoint)
    identity = {
        "model": checkpoint.fingerprint(),
        "recipe": recipe(callback),
        "calibration": _gathered(batches_digest(list(batches))),
        "world_size": torch.distributed.get_world_size() if is_distributed() else 1,
    }
    temporary = checkpoint_dir is None
    if temporary:
        output.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.stream-", dir=output.parent))
    else:
        stage = Path(checkpoint_dir)
        stage.mkdir(parents=True, exist_ok=True)
    try:
        stream = StreamedBlocks(model, checkpoint, callback, stage, identity)
        with streaming(stream):
            callback.apply(model, batches)
        _barrier()
        if is_rank_zero():
            stream.write(output)
        _barrier()
        if is_rank_zero():
            stream.clean()
    finally:
        if temporary:
            shutil.rmtree(stage, ignore_errors=True)
    return output


def _gathered(digest: str) -> list[str]:
    """Every rank's calibration digest, in rank order (one entry without DDP)."""
    if not is_distributed():
        return [digest]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, digest)
    return out
