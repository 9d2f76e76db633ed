"""Running a model over calibration batches, for post-training quantization (SmoothQuant, GPTQ).

A calibration batch is whatever the model's ``forward`` takes: a Tensor (one positional input), a tuple or list
(positional inputs) or a Mapping such as a tokenizer's output (keyword inputs). Nothing here stores activations
beyond what a caller asks for: statistics are gathered by hooks as running reductions, and the true-sequential
GPTQ driver keeps one block's inputs at a time (:func:`capture_inputs`, :func:`replace_hidden`).

Data-parallel runs combine statistics with :func:`all_reduce_` (a no-op without an initialised process group).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def split_inputs(batch: Any) -> Inputs:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` from one calibration batch.

    A Tensor is one positional input, a tuple or list the positional inputs, a Mapping the keyword inputs.

    Raises:
        TypeError: any other type (naming it).
    """
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise TypeError(
        f"batches must yield a Tensor, a tuple / list (positional inputs) or a dict (keyword inputs), "
        f"got {type(batch).__name__}"
    )


def head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a calibration batch: every Tensor sharing the first Tensor's leading size is cut."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    tensors = [t for t in items if isinstance(t, Tensor)]
    size = tensors[0].shape[0] if tensors and tensors[0].dim() else None

    def cut(t: Any) -> Any:
        return t[:n] if isinstance(t, Tensor) and t.dim() and t.shape[0] == size else t

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every Tensor inside (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj) if not hasattr(obj, "_fields") else obj
    return obj


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(*args, **kwargs)`` for one calibration batch, moved to the model's device."""
    args, kwargs = split_inputs(to_device(batch, model_device(model)))
    return model(*args, **kwargs)


def token_mask(batch: Any) -> Tensor | None:
    """The ``(B, T)`` bool mask of real (not padding) tokens of a tokenizer-style batch, or None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def real_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of a layer input ``x`` (B, T, C) at the real tokens of ``mask`` (B, T) as ``(n, C)``; ``x``
    unchanged when there is no mask or the shapes do not line up (e.g. a pooler's ``(B, C)`` input)."""
    if mask is None or x.dim() != 3 or x.shape[:2] != mask.shape:
        return x
    return x[mask.to(x.device)]


def float_tensors(out: Any) -> list[Tensor]:
    """Every floating-point Tensor in a model output (Tensor, tuple, list, dict or ``ModelOutput``), in order."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in float_tensors(item)]
    return []


def first_tensor(out: Any) -> Tensor:
    """The main output of a layer: ``out`` itself, or the first Tensor of a tuple / dict (HF layers return tuples)."""
    tensors = float_tensors(out)
    if not tensors:
        raise TypeError(f"expected a Tensor output, got {type(out).__name__}")
    return tensors[0]


def relative_error(reference: Any, other: Any) -> float:
    """``max_i ||a_i - b_i|| / ||a_i||`` over the float Tensors of two model outputs of the same structure."""
    pairs = zip(float_tensors(reference), float_tensors(other), strict=True)
    return max(float((b.float() - a.float()).norm() / a.float().norm().clamp_min(1e-30)) for a, b in pairs)


def is_distributed() -> bool:
    """Whether a torch.distributed process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """All-reduce ``tensor`` in place across data-parallel ranks (``"sum"`` or ``"max"``); a no-op without DDP."""
    if is_distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Broadcast ``tensor`` in place from rank ``src`` so every rank holds identical values; a no-op without DDP."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


class Progress:
    """A progress bar over ``total`` steps: tqdm on rank 0 when stderr is a terminal, silent otherwise.

    Use as a context manager; :meth:`step` advances it and shows what was just processed.
    """

    def __init__(self, total: int, desc: str) -> None:
        quiet = not sys.stderr.isatty() or (is_distributed() and dist.get_rank() != 0)
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def step(self, what: str = "") -> None:
        """Advance by one, labelled ``what``."""
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout, BatchNorm frozen) and restore each module's mode afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def hooks(handles: Sequence[Any]) -> Iterator[None]:
    """Remove the given hook handles on exit, whatever happens inside."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def find_blocks(model: nn.Module, layers: Iterable[str]) -> tuple[str, nn.ModuleList] | None:
    """The repeated stack of a transformer (e.g. ``encoder.layer``, ``model.layers``): the ``nn.ModuleList`` of
    same-class modules holding the most of ``layers`` (qualified names), or None when no such stack exists."""
    names = list(layers)
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or len({type(m) for m in module}) > 1:
            continue
        count = sum(n.startswith(f"{name}.") for n in names)
        if count > best_count:
            best, best_count = (name, module), count
    return best


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured (see :func:`run_until`)."""


def run_until(run: Callable[[], Any]) -> None:
    """Call ``run()``; a :class:`StopForward` raised inside ends it quietly."""
    with suppress(StopForward):
        run()


# Keyword inputs of a block that hold a key/value cache; replaying a block with them would grow the cache.
CACHE_KWARGS = frozenset({"past_key_value", "past_key_values", "layer_past", "cache"})


def capture_inputs(model: nn.Module, module: nn.Module, batches: Sequence[Any]) -> list[Inputs]:
    """The ``(args, kwargs)`` ``module`` receives for each calibration batch; the forward stops right there.

    Key/value caches among the keyword inputs (:data:`CACHE_KWARGS`) are dropped and ``use_cache`` set to False, so
    the block can be replayed any number of times.

    Raises:
        RuntimeError: ``module`` is not called for some batch.
    """
    stored: list[Inputs] = []

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = {k: None if k in CACHE_KWARGS else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        stored.append((args, kwargs))
        raise StopForward

    with hooks([module.register_forward_pre_hook(hook, with_kwargs=True)]), torch.no_grad():
        for batch in batches:
            try:
                call_model(model, batch)
            except StopForward:
                continue
            raise RuntimeError(f"{type(module).__name__} was not called by the model's forward on a calibration batch")
    return stored


def replace_hidden(inputs: Inputs, hidden: Tensor) -> Inputs:
    """``inputs`` of a block with its hidden states (first positional, or ``hidden_states=``) replaced."""
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise ValueError(
        "cannot find the hidden states among the block's inputs (no positional argument, no hidden_states)"
    )


def _tensor_key(x: Tensor) -> tuple[Any, ...]:
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device


class Dataflow(NamedTuple):
    """Which layers share an input and what produced it, from one observed forward pass.

    Attributes:
        groups: layer names grouped by the very same input tensor (e.g. q, k, v), in execution order; layers the
            pass never called come last, one group each.
        producers: for a group index, the name of the candidate module whose output *is* that group's input (same
            storage, shape and strides, and the same values, so an in-place change in between does not count).
    """

    groups: list[list[str]]
    producers: dict[int, str]


def dataflow(
    run: Callable[[], Any], layers: Mapping[str, nn.Module], candidates: Mapping[str, nn.Module] | None = None
) -> Dataflow:
    """Observe one forward pass (``run()``) and return the :class:`Dataflow` of ``layers``.

    Every input and candidate output is kept alive (with a copy of its values) until the pass ends, so no later
    tensor can reuse its memory and alias its identity; call this on one small batch.
    """
    seen_inputs: dict[str, tuple[tuple[Any, ...], Tensor, Tensor]] = {}
    outputs: dict[tuple[Any, ...], tuple[str, Tensor, Tensor]] = {}

    def in_hook(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in seen_inputs and isinstance(args[0], Tensor):
                seen_inputs[name] = (_tensor_key(args[0]), args[0], args[0].detach().clone())

        return hook

    def out_hook(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, __: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                outputs.setdefault(_tensor_key(out), (name, out, out.detach().clone()))

        return hook

    handles = [m.register_forward_pre_hook(in_hook(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(out_hook(n)) for n, m in (candidates or {}).items()]
    with hooks(handles), torch.no_grad():
        run()
    by_key: dict[tuple[Any, ...], list[str]] = {}
    for name, (key, _, _) in seen_inputs.items():  # dicts keep insertion (= execution) order
        by_key.setdefault(key, []).append(name)
    groups = list(by_key.values())
    found = {}
    for index, group in enumerate(groups):
        key, _, value = seen_inputs[group[0]]
        if key in outputs and torch.equal(outputs[key][2], value):
            found[index] = outputs[key][0]
    groups += [[n] for n in layers if n not in seen_inputs]
    return Dataflow(groups, found)
