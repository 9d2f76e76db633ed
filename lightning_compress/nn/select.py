"""Choosing the layers to compress by ``targets`` / ``ignore`` regexes, swapping them, and undoing a failed change."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_compress.functional.checks import check_patterns

log = logging.getLogger(__name__)

# Layers a compression callback acts on unless the user says otherwise.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_default_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear or Conv layer (the default selection)."""
    return isinstance(module, DEFAULT_LAYER_TYPES)


def select_layers(
    model: nn.Module,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    accept: Callable[[nn.Module], bool] = is_default_layer,
    kind: str = "Linear / Conv",
) -> dict[str, nn.Module]:
    """Pick the layers a callback compresses, by name.

    A layer is selected when ``accept(module)`` holds (Linear and Conv by default), its qualified name (as in
    ``model.named_modules()``) fully matches one of ``targets`` (every such layer when ``targets`` is None),
    and it matches none of ``ignore`` (``re.fullmatch``, so ``"fc.*"`` means names starting with "fc").
    With ``targets=None`` a language model's output embeddings (what a Hugging Face model's
    ``get_output_embeddings()`` returns: ``lm_head``, often the input embedding table itself, tied) are left out, as
    GPTQ's, AWQ's and llm-compressor's recipes leave them: compressing them degrades every token twice. Name them in
    ``targets`` to include them.

    Args:
        model: the model to search.
        targets: regex or list of regexes; None means every accepted layer.
        ignore: regex or list of regexes to exclude.
        accept: which modules can be selected at all.
        kind: how to name those modules in the error message.

    Returns:
        ``{name: module}`` in ``named_modules()`` order.

    Raises:
        ValueError: the selection is empty (naming the patterns and the candidate layers).
    """
    wanted = check_patterns("targets", targets)
    unwanted = check_patterns("ignore", ignore)
    candidates = {n: m for n, m in model.named_modules() if n and accept(m)}
    head = output_embeddings(model) if not wanted else None
    chosen = {
        n: m
        for n, m in candidates.items()
        if (not wanted or any(p.fullmatch(n) for p in wanted))
        and not any(p.fullmatch(n) for p in unwanted)
        and m is not head
    }
    if not chosen:
        raise ValueError(
            f"targets={targets!r} with ignore={ignore!r} match no layer; allowed: regexes over the names of "
            f"the model's {kind} layers: {sorted(candidates) or 'none'}"
        )
    for p in unwanted:
        if not any(p.fullmatch(n) for n in candidates):
            log.warning(
                "ignore pattern %r matches none of the model's %s layers: %s", p.pattern, kind, sorted(candidates)
            )
    return chosen


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """A language model's output embedding layer (Hugging Face's ``get_output_embeddings()`` of ``model`` or of the
    first submodule that has one, as when a LightningModule wraps the language model), or None."""
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        try:
            head = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(head, nn.Module):
            return head
    return None


def retyped(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` as class ``cls``: the same Parameters, buffers and submodules (in dicts of its
    own, so adding or removing one leaves ``module`` as it was), every other attribute shared."""
    new = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, dict):  # _parameters, _buffers, _modules, hook dicts
            object.__setattr__(new, key, type(value)(value))
    new.__class__ = cls
    return new


def replace_layers(model: nn.Module, new: Mapping[str, nn.Module]) -> None:
    """Put each ``new[name]`` in place of the submodule ``name`` of ``model``."""
    for name, module in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


@contextmanager
def restored_on_error(model: nn.Module) -> Iterator[None]:
    """Snapshot ``model``'s parameters and buffers and put them back if the body raises: never half-converted.

    Tensors on the ``meta`` device (a streamed model's blocks, whose weights stay on disk) hold nothing to restore.
    """
    snapshot = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if not v.is_meta}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                if k in snapshot and not v.is_meta:
                    v.copy_(snapshot[k])
        raise


@contextmanager
def replaced_on_error(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """Put each of ``layers`` (``{name: the original module}``) back into ``model`` if the body raises, undoing any
    replacement the body made (use inside :func:`restored_on_error`, which then restores their weights)."""
    try:
        yield
    except BaseException:
        replace_layers(model, layers)
        raise
