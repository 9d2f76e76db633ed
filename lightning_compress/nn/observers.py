"""Activation range observers for quantization-aware training and post-training calibration.

An observer is an identity module that keeps a running range ``[min_val, max_val]`` of the tensors it sees (per
tensor, float32 statistics whatever the input dtype: nothing is stored but the range) and turns it into quantization
parameters with :func:`~lightning_compress.functional.quant.qparams_from_range`.

When it observes: in training mode, unless frozen; in eval mode only inside :func:`calibrating` (or
``observer.calibrate()``), for post-training calibration without dropout or BatchNorm updates. ``frozen`` wins over
both: a frozen observer never changes its range.

The state (range, batch count, frozen flag) is deliberately **not** in the module's ``state_dict`` (non-persistent
buffers), so a model with observers inserted still loads into the plain model with ``strict=True``; the QAT callback
saves it with :meth:`Observer.observer_state` / :meth:`Observer.load_observer_state`. Across DDP ranks each statistic
combines as :meth:`Observer.reduce_ops` declares, applied to many observers at once by :func:`sync_observers`.

Kinds, plain classes that Hydra instantiates by ``_target_``: :class:`MinMaxObserver` (running min/max),
:class:`MovingAverageMinMaxObserver` (exponential moving average (EMA) of per-batch min/max, as ``torch.ao``'s),
:class:`PercentileObserver` (EMA of per-batch percentiles) and :class:`MSEObserver` (EMA of the per-batch clipping range
that minimises the fake-quantization mean squared error).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_compress.functional.quant import QParams, check_bits, fake_quantize, qparams_from_range
from lightning_compress.nn.distributed import all_reduce_many_

# Elements (grid points x activation elements) fake-quantized at once by the MSE search; bounds its temporaries.
_MSE_CHUNK = 2**24


class Observer(nn.Module, abc.ABC):
    """Identity module that tracks a running ``[min_val, max_val]`` of its inputs; subclasses define the update.

    Attributes:
        min_val, max_val: 0-dim float32 buffers (``+inf`` / ``-inf`` before any data), not in ``state_dict``.
        num_batches: 0-dim int64 buffer, batches observed on this rank (the max over ranks after
            :func:`sync_observers`).
        frozen: when True the range never changes.
        observing: when True the observer also updates in eval mode (set by :func:`calibrating`).
    """

    _REDUCE_OPS: ClassVar[dict[str, str]] = {"min_val": "mean", "max_val": "mean"}

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor(math.inf), persistent=False)
        self.register_buffer("max_val", torch.tensor(-math.inf), persistent=False)
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.int64), persistent=False)
        self.frozen = False
        self.observing = False

    @property
    def updating(self) -> bool:
        """Whether a forward updates the range now: training or calibrating, and not frozen."""
        return not self.frozen and (self.training or self.observing)

    def fused_update(self) -> tuple[bool, float | None]:
        """Whether :func:`~lightning_compress.functional.fused.observe_fake_quantize` reproduces this observer's
        update, and its ``averaging_constant`` (None: running min / max). True only for :class:`MinMaxObserver` and
        :class:`MovingAverageMinMaxObserver` whose range and update rules are not overridden."""
        cls = type(self)
        if cls._batch_range is not Observer._batch_range:
            return False, None
        if cls._update is MinMaxObserver._update:
            return True, None
        if isinstance(self, MovingAverageMinMaxObserver) and cls._update is _EMAObserver._update:
            return True, self.averaging_constant
        return False, None

    def forward(self, x: Tensor) -> Tensor:
        """Update the statistics from ``x`` (training or calibrating, not frozen, not empty); return ``x`` as is."""
        if self.updating and x.numel() > 0:
            with torch.no_grad():
                lo, hi = self._batch_range(x.detach())
                self._update(lo.float(), hi.float())
                self.num_batches += 1
        return x

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """This batch's ``(low, high)`` estimate as 0-dim tensors: its min and max."""
        return torch.aminmax(x)

    @abc.abstractmethod
    def _update(self, lo: Tensor, hi: Tensor) -> None:
        """Fold one batch's float32 ``(lo, hi)`` into ``min_val`` / ``max_val``."""

    def qparams(self, bits: int, symmetric: bool = False) -> QParams:
        """Per-tensor ``QParams`` (0-dim scale and zero-point) of the observed range, by ``qparams_from_range``.

        Raises:
            RuntimeError: the observer has not seen any data yet.
        """
        check_bits(bits)
        if int(self.num_batches) == 0:
            raise RuntimeError(
                f"observer {self!r} has seen no data; run at least one training or calibration batch before converting"
            )
        return qparams_from_range(self.min_val, self.max_val, bits, symmetric)

    def reduce_ops(self) -> dict[str, str]:
        """How each statistic combines across ranks: buffer name -> ``"min"``, ``"max"`` or ``"mean"``."""
        return dict(self._REDUCE_OPS)

    def observer_state(self) -> dict[str, Tensor | bool | int]:
        """Checkpointable state: every buffer (cloned tensors; ``num_batches`` as int) and ``frozen``."""
        state: dict[str, Tensor | bool | int] = {n: b.detach().clone() for n, b in self.named_buffers(recurse=False)}
        state["num_batches"] = int(self.num_batches)
        state["frozen"] = self.frozen
        return state

    @torch.no_grad()
    def load_observer_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`observer_state` returned (values are copied into this observer's buffers).

        Raises:
            ValueError: the keys differ from this observer's (missing or unexpected state).
        """
        names = [name for name, _ in self.named_buffers(recurse=False)]
        if set(state) != {*names, "frozen"}:
            raise ValueError(f"{type(self).__name__} state has keys {sorted(state)}, expected {sorted(names)}+frozen")
        for name in names:
            getattr(self, name).copy_(torch.as_tensor(state[name]))
        self.frozen = bool(state["frozen"])

    def freeze(self) -> None:
        """Stop updating the range (training and calibration alike)."""
        self.frozen = True

    def unfreeze(self) -> None:
        """Resume updating the range."""
        self.frozen = False

    def calibrate(self) -> AbstractContextManager[None]:
        """Context in which this observer updates in eval mode too; same as ``calibrating(self)``."""
        return calibrating(self)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Observer:
        """Move with the model (``.to(device)``) but keep float statistics float32 under ``.to(bfloat16)``."""
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point():
                self._buffers[name] = buf.float()
        return self

    def extra_repr(self) -> str:
        return f"frozen={self.frozen}"


@contextmanager
def calibrating(module: nn.Module) -> Iterator[None]:
    """Context in which every observer in ``module`` (or ``module`` itself) updates in eval mode too.

    Raises:
        ValueError: ``module`` holds no observer.
    """
    observers = [m for m in module.modules() if isinstance(m, Observer)]
    if not observers:
        raise ValueError(f"calibrating: {type(module).__name__} holds no Observer")
    previous = [m.observing for m in observers]
    for m in observers:
        m.observing = True
    try:
        yield
    finally:
        for m, flag in zip(observers, previous, strict=True):
            m.observing = flag


class MinMaxObserver(Observer):
    """Running min of batch minima and max of batch maxima: the exact range of everything observed."""

    _REDUCE_OPS: ClassVar[dict[str, str]] = {"min_val": "min", "max_val": "max"}

    def _update(self, lo: Tensor, hi: Tensor) -> None:
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)


class _EMAObserver(Observer):
    """Exponential moving average of per-batch ``(lo, hi)``: ``v <- v + c * (v_batch - v)``; batch 1 initialises."""

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = float(averaging_constant)

    def _update(self, lo: Tensor, hi: Tensor) -> None:
        if int(self.num_batches) == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            return
        c = self.averaging_constant
        self.min_val.add_(lo.sub(self.min_val).mul_(c))
        self.max_val.add_(hi.sub(self.max_val).mul_(c))

    def extra_repr(self) -> str:
        return f"averaging_constant={self.averaging_constant}, {super().extra_repr()}"


class MovingAverageMinMaxObserver(_EMAObserver):
    """EMA of per-batch min and max, as ``torch.ao.quantization.MovingAverageMinMaxObserver`` (Jacob et al. 2018).

    Args:
        averaging_constant: EMA weight ``c`` of the new batch, in ``(0, 1]`` (1 keeps only the last batch).
    """


def _quantile(flat: Tensor, q: float) -> Tensor:
    """``torch.quantile(flat, q)`` (linear interpolation) of a 1-D tensor, from its shorter tail by ``topk``.

    ``torch.quantile`` sorts and refuses more than 16M elements; the tail beyond ``q`` is ``~min(q, 1-q) * n``
    elements, so a ``topk`` of that size is one pass for the extreme quantiles a range needs. Float32 result.
    """
    n = flat.numel()
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    if q >= 0.5:
        vals = flat.topk(n - lo).values  # descending: vals[n - 1 - i] is the i-th smallest
        below, above = vals[n - 1 - lo], vals[n - 1 - hi]
    else:
        vals = flat.topk(hi + 1, largest=False).values  # ascending
        below, above = vals[lo], vals[hi]
    return torch.lerp(below.float(), above.float(), pos - lo)


class PercentileObserver(_EMAObserver):
    """EMA of per-batch lower / upper percentiles: ``[P_{100-p}(x), P_p(x)]``, ignoring rare outliers.

    Each batch's percentiles are exact (``torch.quantile``'s linear interpolation over all elements, no subsampling),
    computed from the two tails with ``topk`` (see :func:`_quantile`), so any input size works.

    Args:
        percentile: upper percentile ``p`` in ``(50, 100]``; the lower one is ``100 - p``. 100 is min / max.
        averaging_constant: EMA weight of the new batch, in ``(0, 1]``.
    """

    def __init__(self, percentile: float = 99.99, averaging_constant: float = 0.01) -> None:
        super().__init__(averaging_constant)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat, q = x.reshape(-1), self.percentile / 100
        return _quantile(flat, 1.0 - q), _quantile(flat, q)

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, {super().extra_repr()}"


class MSEObserver(_EMAObserver):
    """EMA of the per-batch clipping range ``alpha * [min, max]`` that minimises ``mean((x - fake_quant(x))^2)``.

    ``alpha`` is searched on the grid ``{1, (grid-1)/grid, ..., 1/grid}``; ties keep the wider range. Each grid point
    costs a fake-quantization pass over the batch (in chunks of ``2^24`` elements), so this observer suits
    calibration or a few batches more than every training step. The optimum depends on the code, hence ``bits`` and
    ``symmetric`` here; :meth:`qparams` must be asked for the same.

    Args:
        bits: code width in ``[2, 8]``.
        symmetric: symmetric (zero-point 0) or asymmetric quantization.
        grid: number of ``alpha`` candidates, a positive int.
        averaging_constant: EMA weight of the new batch, in ``(0, 1]``.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, grid: int = 100, averaging_constant: float = 0.01):
        super().__init__(averaging_constant)
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        self.bits, self.symmetric, self.grid = check_bits(bits), bool(symmetric), grid

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.reshape(-1).float()
        lo, hi = torch.aminmax(flat)
        alphas = torch.arange(self.grid, 0, -1, device=flat.device, dtype=torch.float32) / self.grid
        scale, zero_point = qparams_from_range(alphas * lo, alphas * hi, self.bits, self.symmetric)
        chunk = max(1, _MSE_CHUNK // flat.numel())
        errors = [
            (fake_quantize(flat.expand(len(s), -1), s[:, None], z[:, None], self.bits) - flat).square().mean(1)
            for s, z in zip(scale.split(chunk), zero_point.split(chunk), strict=True)
        ]
        alpha = alphas[torch.cat(errors).argmin()]
        return alpha * lo, alpha * hi

    def qparams(self, bits: int, symmetric: bool = False) -> QParams:
        """As :meth:`Observer.qparams`; raises ValueError unless ``bits`` / ``symmetric`` match the constructor's."""
        if (bits, bool(symmetric)) != (self.bits, self.symmetric):
            raise ValueError(
                f"MSEObserver optimised its range for bits={self.bits}, symmetric={self.symmetric}; "
                f"asked for bits={bits}, symmetric={symmetric}. Build it with the bits / symmetric you convert to"
            )
        return super().qparams(bits, symmetric)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, grid={self.grid}, {super().extra_repr()}"


@torch.no_grad()
def sync_observers(
    observers: Sequence[Observer], all_reduce_many: Callable[[list[Tensor], str], None] = all_reduce_many_
) -> None:
    """All-reduce the statistics of ``observers`` across ranks in place: one collective per reduce op for all of them.

    Each statistic combines as its observer's :meth:`~Observer.reduce_ops` declares; ``num_batches`` with ``"max"``,
    so a rank that saw no batch can still convert after a sync of a min-max observer. A ``"mean"`` statistic assumes
    every rank has observed data (the EMA estimates of an idle rank are infinite). Call it on every rank (it is a
    collective), frozen or not.

    Args:
        observers: the observers, in the same order on every rank.
        all_reduce_many: ``(tensors, op)`` reducing the tensors in place (default: the library's collective helper).
    """
    by_op: dict[str, list[Tensor]] = {}
    for obs in observers:
        for name, op in [*obs.reduce_ops().items(), ("num_batches", "max")]:
            by_op.setdefault(op, []).append(getattr(obs, name))
    for op, tensors in by_op.items():
        all_reduce_many(tensors, op)
