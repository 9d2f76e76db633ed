"""Shared by the callbacks: layer selection by ``targets`` / ``ignore`` regexes, swapping layers, calibration."""

from __future__ import annotations

import abc
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

# Layers a compression callback acts on unless the user says otherwise.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def compile_patterns(patterns: str | Sequence[str] | None, name: str) -> list[re.Pattern[str]]:
    """Compile regexes given as one string or a list; raises ValueError naming ``name`` on a bad regex."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{name} must be a regex string or a list of them, got {p!r}")
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{name} holds an invalid regex {p!r}: {err}") from None
    return compiled


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
    wanted = compile_patterns(targets, "targets")
    unwanted = compile_patterns(ignore, "ignore")
    candidates = {n: m for n, m in model.named_modules() if n and accept(m)}
    chosen = {
        n: m
        for n, m in candidates.items()
        if (not wanted or any(p.fullmatch(n) for p in wanted)) and not any(p.fullmatch(n) for p in unwanted)
    }
    if not chosen:
        raise ValueError(
            f"targets={targets!r} with ignore={ignore!r} match no layer; allowed: regexes over the names of "
            f"the model's {kind} layers: {sorted(candidates) or 'none'}"
        )
    return chosen


def replace_layers(model: nn.Module, new: Mapping[str, nn.Module]) -> None:
    """Put each ``new[name]`` in place of the submodule ``name`` of ``model``."""
    for name, module in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


# Keys a training batch dict carries besides the model's inputs.
LABEL_KEYS = frozenset({"labels", "label", "targets", "target", "y"})


def default_inputs(batch: Any) -> Any:
    """The model inputs of a training batch: ``x`` of ``(x, y, ...)``, a dict without its label keys, else as is."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


@contextmanager
def restored_on_error(model: nn.Module) -> Iterator[None]:
    """Snapshot ``model``'s parameters and buffers and put them back if the body raises: never half-converted."""
    snapshot = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                if k in snapshot:
                    v.copy_(snapshot[k])
        raise


class CalibrationCallback(pl.Callback, abc.ABC):
    """Base of the post-training callbacks: at fit end, :meth:`apply` on calibration batches; also one-shot.

    The batches are the first ``num_batches`` of ``calibration_data`` (any iterable of training batches; the
    Trainer's train dataloader when None), each turned into model inputs by ``input_fn`` (:func:`default_inputs`
    when None). Under DDP every rank calibrates on its own shard and statistics are all-reduced.
    """

    def __init__(
        self,
        num_batches: int | None = 32,
        calibration_data: Iterable[Any] | None = None,
        input_fn: Callable[[Any], Any] | None = None,
        targets: str | Sequence[str] | None = None,
        ignore: str | Sequence[str] | None = None,
    ) -> None:
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):  # fmt: skip
            raise ValueError(f"num_batches must be a positive int or None (all batches), got {num_batches!r}")
        compile_patterns(targets, "targets"), compile_patterns(ignore, "ignore")
        self.num_batches, self.calibration_data = num_batches, calibration_data
        self.input_fn = input_fn or default_inputs
        self.targets, self.ignore = targets, ignore
        self.exported: dict[str, dict[str, Tensor]] = {}

    def calibration_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The model inputs to calibrate on, from ``calibration_data`` or the train dataloader."""
        source = self.calibration_data if self.calibration_data is not None else trainer.train_dataloader
        if source is None:
            raise RuntimeError(f"{type(self).__name__}: no calibration_data and the Trainer has no train dataloader")
        return [self.input_fn(b) for b in itertools.islice(source, self.num_batches)]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, self.calibration_batches(trainer))

    @abc.abstractmethod
    def apply(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, dict[str, Tensor]]:
        """Quantize ``model`` in place on ``batches`` (model inputs: Tensor, tuple or dict); returns the int state."""
