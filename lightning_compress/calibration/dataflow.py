"""Which layers read the same tensor, and which module produced it, from one observed forward pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_compress.calibration.capture import hooks


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
