"""DistillationModule: train a student LightningModule (or nn.Module) to mimic a frozen teacher.

Loss (Hinton et al. 2015; DistilBERT, Sanh et al. 2019)::

    L = α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − α) · CE(y, z_s) + β · Σ_l d(h_s[l], h_t[map(l)])

with ``d`` the cosine (``1 − cos``) or MSE distance between student and teacher hidden states (the outputs of
their transformer blocks, found as the repeated ``nn.ModuleList`` of each model), through an optional learned
projection when the widths differ. The teacher is frozen: eval mode, no gradients, not a registered submodule
(so it is in neither the optimizer nor the checkpoint). Checkpoints hold the student's own weight keys, so they
load back into the student alone with ``strict=True``.

Optimizer rule: with ``lr=None`` (the default) a student LightningModule's own ``configure_optimizers`` (optimizers
and schedulers) trains it, the projections joining its first optimizer; with ``lr`` given, AdamW at ``lr`` with linear
warmup and decay (the DistilBERT recipe) trains every trainable parameter, whatever the student defines. A student
without an optimizer of its own (a plain ``nn.Module``) needs ``lr``: construction raises ValueError otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from lightning_compress.calibration.batches import LABEL_KEYS, call_args, first_tensor, rows, split_batch, token_mask
from lightning_compress.calibration.capture import find_blocks
from lightning_compress.evaluation import IGNORE_INDEX, is_causal_lm, next_token_loss, next_token_targets
from lightning_compress.functional.distill import HIDDEN_LOSSES, hidden_state_loss, kd_loss, top_k_kd_loss, top_k_logits
from lightning_compress.functional.schedules import linear_warmup_decay

STUDENT = "student."
PROJECTIONS = "projections."


def logits_of(output: Any) -> Tensor:
    """The logits in a model output: a Tensor, an object with ``.logits`` (Hugging Face), or a tuple's first item."""
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else first_tensor(output)


TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adamw_warmup_decay(
    params: Sequence[nn.Parameter], lr: float, weight_decay: float, warmup_fraction: float, total_steps: int
) -> dict[str, Any]:
    """AdamW at peak ``lr`` with linear warmup over ``warmup_fraction`` of ``total_steps`` optimizer steps, then linear
    decay to 0 (the DistilBERT / BERT fine-tuning recipe), as a ``configure_optimizers`` return value stepped per step.

    Raises:
        ValueError: ``lr`` not positive, ``weight_decay`` negative or ``warmup_fraction`` outside ``[0, 1)``.
    """

    def number(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    if not (number(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (number(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if not (number(warmup_fraction) and 0 <= warmup_fraction < 1):
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
    if not params:
        return {}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = int(warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, warmup, total_steps)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _config(model: nn.Module) -> Any:
    """The first Hugging Face-style ``config`` among ``model``'s modules, or None."""
    return next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)


def num_outputs(model: nn.Module) -> int | None:
    """The class count a model predicts: ``config.num_labels``, a ``num_classes`` attribute, or the last Linear's
    ``out_features``; None when none exists."""
    config = _config(model)
    if config is not None and getattr(config, "num_labels", None):
        return int(config.num_labels)
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated block stack of a transformer (``encoder.layer``, ``model.layers``); TypeError when none."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = find_blocks(model, linears)
    if found is None:
        raise TypeError(f"{type(model).__name__} has no transformer block stack (an nn.ModuleList of equal blocks)")
    return found[1]


def hidden_width(model: nn.Module) -> int | None:
    """The hidden size of a transformer (``config.hidden_size``), or None when unknown."""
    config = _config(model)
    return getattr(config, "hidden_size", None)


def student_from_teacher(teacher: nn.Module, layers: Sequence[int] | None = None) -> nn.Module:
    """A shallower copy of a transformer: embeddings, heads and the chosen blocks, weights copied.

    DistilBERT initialised its 6-layer student from teacher layers 0, 2, 4, 7, 9, 11 of 12; the default here takes
    every other block (0, 2, 4 of 6). The copy is in train mode with gradients on, whatever the teacher's state.
    Works on Hugging Face models (``config.num_hidden_layers`` is updated) and any
    model with a block stack.

    Args:
        teacher: the model to copy (left unchanged).
        layers: teacher block indices to keep, increasing; None for every other block.

    Raises:
        ValueError: indices out of range, repeated or unordered. TypeError: no block stack.
    """
    n = len(transformer_blocks(teacher))
    keep = list(range(0, n, 2)) if layers is None else list(layers)
    if not keep or any(not 0 <= i < n for i in keep) or keep != sorted(set(keep)):
        raise ValueError(f"layers={layers!r} must be increasing distinct block indices in [0, {n}); got {keep}")
    trainer = getattr(teacher, "_trainer", None)  # a fitted LightningModule: copy the module, not its Trainer
    student = copy.deepcopy(teacher, memo={} if trainer is None else {id(trainer): None})
    blocks = transformer_blocks(student)
    kept = [blocks[i] for i in keep]
    for position, block in enumerate(kept):  # decoders index their KV cache by layer
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = position
    name = next(k for k, v in student.named_modules() if v is blocks)
    parent, _, child = name.rpartition(".")
    setattr(student.get_submodule(parent), child, nn.ModuleList(kept))
    config = _config(student)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(keep)
    return student.train().requires_grad_(True)  # trainable even when copied from a frozen teacher


def has_own_optimizer(model: nn.Module) -> bool:
    """Whether ``model`` is a LightningModule that overrides ``configure_optimizers``."""
    return isinstance(model, pl.LightningModule) and is_overridden("configure_optimizers", model, pl.LightningModule)


def _leaves(config: Any) -> Iterator[Any]:
    """The non-container items of an optimizer configuration (nested lists, tuples and dicts), in order."""
    if isinstance(config, Mapping):
        for value in config.values():
            yield from _leaves(value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            yield from _leaves(value)
    else:
        yield config


# per-param-group lists that schedulers fill at construction (LambdaLR, ReduceLROnPlateau, CyclicLR, all of them)
_SCHEDULER_LISTS = ("base_lrs", "lr_lambdas", "min_lrs", "max_lrs", "_last_lr")


def _extend_scheduler(scheduler: Any, groups: int) -> None:
    """Give a scheduler built for ``groups`` param groups one more, a copy of its first group's entries."""
    for name in _SCHEDULER_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == groups:
            values.append(values[0])
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _extend_scheduler(child, groups)


def add_param_group(config: Any, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """Add ``params`` to the first optimizer of a ``configure_optimizers`` return value, as a new param group with the
    hyperparameters of that optimizer's first group; the optimizer's schedulers are extended to step it too.

    Returns:
        The optimizer the group was added to.

    Raises:
        TypeError: the configuration holds no optimizer.
    """
    leaves = list(_leaves(config))
    optimizer = next((o for o in leaves if isinstance(o, torch.optim.Optimizer)), None)
    if optimizer is None:
        raise TypeError(f"configure_optimizers returned no torch.optim.Optimizer ({config!r})")
    groups = len(optimizer.param_groups)
    first = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    optimizer.add_param_group({**first, "params": list(params)})
    for scheduler in (s for s in leaves if getattr(s, "optimizer", None) is optimizer):
        _extend_scheduler(scheduler, groups)
    return optimizer


def _sample_keys(inputs: Any) -> list[str]:
    """One content hash per sample of a batch of model inputs (its first dimension)."""
    args, kwargs = call_args(inputs)
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0]
    rows = [t.detach().cpu().reshape(t.shape[0], -1) for t in tensors]
    return [hashlib.sha1(b"".join(r[i].numpy().tobytes() for r in rows)).hexdigest() for i in range(len(rows[0]))]


class DistillationModule(pl.LightningModule):
    """Knowledge distillation from a frozen teacher into a student, for any LightningModule or nn.Module.

    Causal language models (a Hugging Face ``*ForCausalLM`` student, or a
    :class:`~lightning_compress.examples.causal_lm.CausalLMModule`): batches are dicts with ``labels`` = the input ids
    (``-100`` where no loss is wanted); every real next token is a sample of the KD and CE terms (the logits at
    position ``t`` against token ``t + 1``), and validation / test log ``val/perplexity``, ``test/perplexity``.
    For quantization-aware distillation the student is a quantized copy of the teacher (``QATFakeQuant`` on it) and
    the teacher the full-precision model, kept small with ``teacher_dtype="bfloat16"``, ``teacher_batch_size`` and
    ``top_k``.

    Batches are ``(x, y, ...)`` tuples (``x`` the model input) or dicts whose ``labels`` key holds the targets
    (the rest are the model's keyword inputs, e.g. a tokenizer's output). Both models map the inputs to logits (a
    Tensor, or an output with ``.logits``). Validation, test and predict run the student; ``val/acc``,
    ``val/loss``, ``test/acc`` are logged. The student composes with the compression callbacks in the same run
    (``QATFakeQuant``, ``IterativePruning``: layer names start with ``student.``; learned projections live under
    ``projections.``, which you may want in ``ignore``).

    FSDP: under ``ModelParallelStrategy`` (FSDP2), :meth:`configure_model` runs a student LightningModule's own
    ``configure_model`` when it defines one, else applies ``fully_shard`` to each transformer block, the student and
    each projection; under ``FSDPStrategy`` Lightning wraps the module as usual. The teacher stays whole on every rank
    (it is not a submodule). Checkpoints written under an FSDP strategy keep the module's keys (``student.``,
    ``projections.``): those strategies load the weights into this module themselves, before any hook could rename
    them; strip ``student.`` to load one into the student alone.

    Optimizers: with ``lr=None`` (the default) a student LightningModule that overrides ``configure_optimizers``
    trains with its own optimizer(s) and scheduler(s), called with ``student.trainer`` set (so it may read
    ``self.trainer.estimated_stepping_batches``); the projections, if any, join its first optimizer as a param group
    with that optimizer's first group's hyperparameters. Only ``configure_optimizers`` comes from the student, not its
    ``training_step`` or optimizer hooks. With ``lr`` given, AdamW at ``lr`` (``weight_decay``, linear warmup over
    ``warmup_fraction`` of the run, then linear decay to 0) trains the student and the projections, whatever the
    student defines. A student without an optimizer of its own (an ``nn.Module``, or a LightningModule that does not
    override ``configure_optimizers``) needs ``lr``; 5e-5 to 2e-4 suits BERT-size transformers.

    YAML (``conf/experiment/distill_minilm.yaml``)::

        distillation:
          _target_: lightning_compress.DistillationModule
          temperature: 4.0
          alpha: 0.5
          hidden_loss: cosine
          lr: 1.0e-4

    Python::

        module = DistillationModule(student, teacher, temperature=4.0, alpha=0.7)  # student: a LightningModule
        L.Trainer(max_epochs=3).fit(module, datamodule)
        student.load_state_dict(torch.load("last.ckpt")["state_dict"])  # the checkpoint is the student's

    Args:
        student: the model to train (LightningModule or nn.Module); None builds it from the teacher with
            :func:`student_from_teacher` (``student_layers``).
        teacher: any model with the same number of classes; frozen here.
        student_layers: teacher block indices the built student keeps (None: every other block).
        temperature: ``T > 0`` of the soft targets.
        alpha: weight of the KD term in ``[0, 1]`` (``1 − α`` on the hard-label cross-entropy).
        hidden_loss: None, ``"cosine"`` or ``"mse"`` between mapped block outputs.
        hidden_weight: ``β``, weight of the hidden-state loss.
        layer_map: student block ``j`` → teacher block ``layer_map[j]`` (a list, or a dict for some blocks only);
            None: evenly spaced, the last student block on the last teacher block.
        projection: learn a Linear from the student's to the teacher's width per mapped block (required when the
            widths differ).
        cache_teacher: keep the teacher's logits (with ``top_k``, only their top k) per sample, keyed by input
            content, and reuse them in later epochs; only without a hidden-state loss.
        top_k: distil from the teacher's ``k`` largest logits per sample (token), renormalised
            (:func:`~lightning_compress.functional.distill.top_k_kd_loss`), so a cache holds ``k`` values, not the
            vocabulary; None uses every logit.
        teacher_dtype: cast the teacher (in place) to ``"bfloat16"`` / ``"float16"`` / ``"float32"``; its floating
            inputs are cast alike. None leaves it as it is.
        teacher_batch_size: run the teacher on micro-batches of this many samples (each reduced to its top-k
            before the next runs), so its activations and full-vocabulary logits exist for one micro-batch at a
            time; None runs it on the whole batch.
        lr: None to train with the student's own ``configure_optimizers`` (a LightningModule that defines one;
            required otherwise); a positive number for AdamW at this peak learning rate, replacing the student's.
        weight_decay: AdamW's decoupled weight decay, ``>= 0``; used only with ``lr``.
        warmup_fraction: the share of the run, in ``[0, 1)``, spent warming AdamW's rate up from 0 before it decays
            linearly to 0 at the last step; used only with ``lr``.

    Raises:
        ValueError: a bad argument, among them ``lr=None`` with a student that has no optimizer of its own.
        TypeError: a student or teacher that is not an ``nn.Module``.
    """

    def __init__(
        self,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        student_layers: Sequence[int] | None = None,
        temperature: float = 2.0,
        alpha: float = 0.5,
        hidden_loss: str | None = None,
        hidden_weight: float = 1.0,
        layer_map: Sequence[int] | Mapping[int, int] | None = None,
        projection: bool = False,
        cache_teacher: bool = False,
        top_k: int | None = None,
        teacher_dtype: str | None = None,
        teacher_batch_size: int | None = None,
        lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if student is None:
            student = student_from_teacher(teacher, student_layers)
        elif student_layers is not None:
            raise ValueError("student_layers builds the student from the teacher; pass it only with student=None")
        self._validate(student, teacher, temperature, alpha, hidden_loss, cache_teacher)
        self._validate_teacher_memory(top_k, teacher_dtype, teacher_batch_size)
        self._validate_optimizer(student, lr, weight_decay, warmup_fraction)
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: not in parameters(), state_dict(), DDP
        teacher.eval().requires_grad_(False)
        if teacher_dtype is not None:
            teacher.to(TEACHER_DTYPES[teacher_dtype])
        self.top_k, self.teacher_dtype, self.teacher_batch_size = top_k, teacher_dtype, teacher_batch_size
        self.causal = is_causal_lm(student)
        self.temperature, self.alpha, self.hidden_weight = float(temperature), float(alpha), float(hidden_weight)
        self.hidden_loss, self.cache_teacher = hidden_loss, cache_teacher
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.layer_map = self._layer_map(layer_map) if hidden_loss else {}
        self.projections = self._projections(projection) if hidden_loss else nn.ModuleDict()
        self.teacher_cache: dict[str, Tensor] = {}
        classes = num_outputs(student) or 2
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes)
        if self.causal:  # a language model is judged by its perplexity
            self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
            self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    # ----------------------------------------------------------------------------------- validation
    @staticmethod
    def _validate(student: nn.Module, teacher: nn.Module, temperature: float, alpha: float,
                  hidden_loss: str | None, cache_teacher: bool) -> None:  # fmt: skip
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError(f"student and teacher must be nn.Modules, got {type(student).__name__}, "
                            f"{type(teacher).__name__}")  # fmt: skip
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if hidden_loss is not None and hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss={hidden_loss!r} is not supported; allowed: None, {list(HIDDEN_LOSSES)}")
        if cache_teacher and hidden_loss is not None:
            raise ValueError("cache_teacher=True caches logits only; it cannot be combined with a hidden_loss")
        s, t = num_outputs(student), num_outputs(teacher)
        if s is not None and t is not None and s != t:
            raise ValueError(f"the student predicts {s} classes and the teacher {t}; they must be equal")

    @staticmethod
    def _validate_teacher_memory(top_k: int | None, teacher_dtype: str | None, teacher_batch_size: int | None) -> None:
        for name, value in (("top_k", top_k), ("teacher_batch_size", teacher_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if teacher_dtype is not None and teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={teacher_dtype!r} is not supported; allowed: None, {list(TEACHER_DTYPES)}")

    @staticmethod
    def _validate_optimizer(student: nn.Module, lr: float | None, weight_decay: float, warmup_fraction: float) -> None:
        if lr is None and not has_own_optimizer(student):
            raise ValueError(
                f"lr is required: the student ({type(student).__name__}) is not a LightningModule with its own "
                "configure_optimizers; pass lr=<AdamW peak learning rate> (e.g. 5e-5 to 2e-4 for a BERT-size "
                "transformer, about 1e-3 for a small CNN), or a LightningModule student that defines its optimizer"
            )
        try:
            adamw_warmup_decay([], 1.0 if lr is None else lr, weight_decay, warmup_fraction, 1)
        except ValueError as err:
            raise ValueError(
                str(err).replace("lr must be", "lr must be None (the student's own optimizer) or")
            ) from None

    def _layer_map(self, layer_map: Sequence[int] | Mapping[int, int] | None) -> dict[int, int]:
        n_s, n_t = len(transformer_blocks(self.student)), len(transformer_blocks(self.teacher))
        if layer_map is None:  # evenly spaced, last on last
            mapping = {j: round((j + 1) * n_t / n_s) - 1 for j in range(n_s)}
        else:
            mapping = dict(layer_map) if isinstance(layer_map, Mapping) else dict(enumerate(layer_map))
        bad = {j: t for j, t in mapping.items() if not (0 <= int(j) < n_s and 0 <= int(t) < n_t)}
        if bad or not mapping:
            raise ValueError(
                f"layer_map={layer_map!r} is out of range: student blocks are 0..{n_s - 1}, teacher blocks 0..{n_t - 1}"
            )
        return {int(j): int(t) for j, t in mapping.items()}

    def _projections(self, projection: bool) -> nn.ModuleDict:
        w_s, w_t = hidden_width(self.student), hidden_width(self.teacher)
        if not projection:
            if w_s is not None and w_t is not None and w_s != w_t:
                raise ValueError(
                    f"hidden_loss between widths {w_s} (student) and {w_t} (teacher) needs projection=True"
                )
            return nn.ModuleDict()
        if w_s is None or w_t is None:
            raise ValueError("projection=True needs both models' hidden sizes (a Hugging Face config.hidden_size)")
        return nn.ModuleDict({str(j): nn.Linear(w_s, w_t) for j in self.layer_map})

    # ----------------------------------------------------------------------------------- forward
    @staticmethod
    def split_batch(batch: Any) -> tuple[Any, Tensor]:
        """``(model inputs, targets)`` by :func:`~lightning_compress.calibration.batches.split_batch`; ValueError
        when the batch carries no targets."""
        inputs, targets = split_batch(batch)
        if targets is None:
            raise ValueError(
                f"batches must be (inputs, targets, ...) tuples or dicts with targets under one of {sorted(LABEL_KEYS)}"
            )
        return inputs, targets

    @staticmethod
    def _run(model: nn.Module, inputs: Any) -> Any:
        args, kwargs = call_args(inputs)
        return model(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The student's logits for one batch of model inputs: ``forward(inputs)`` (a tensor, tuple or dict, as a
        batch holds them) or the student's own call signature (``forward(input_ids=..., attention_mask=...)``, as the
        calibration of a PTQ callback calls a model)."""
        if kwargs or len(args) != 1:
            return logits_of(self.student(*args, **kwargs))
        return logits_of(self._run(self.student, args[0]))

    def _with_hidden(self, model: nn.Module, inputs: Any, wanted: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """Logits and the outputs of the ``wanted`` blocks of ``model``, captured by forward hooks."""
        hidden: dict[int, Tensor] = {}
        blocks = transformer_blocks(model)
        handles = [blocks[i].register_forward_hook(lambda _m, _a, out, i=i: hidden.__setitem__(i, first_tensor(out)))
                   for i in wanted]  # fmt: skip
        try:
            logits = logits_of(self._run(model, inputs))
        finally:
            for h in handles:
                h.remove()
        return logits, hidden

    def _teacher_inputs(self, inputs: Any) -> Any:
        """``inputs`` with floating tensors in the teacher's dtype (token ids stay integers)."""
        if self.teacher_dtype is None:
            return inputs
        dtype = TEACHER_DTYPES[self.teacher_dtype]

        def cast(t: Any) -> Any:
            return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

        if isinstance(inputs, Mapping):
            return {k: cast(v) for k, v in inputs.items()}
        return type(inputs)(cast(v) for v in inputs) if isinstance(inputs, (tuple, list)) else cast(inputs)

    @torch.no_grad()
    def _teacher_targets(self, inputs: Any) -> Tensor | tuple[Tensor, Tensor]:
        """The teacher's soft targets for a batch: its logits, or with ``top_k`` its ``(values, indices)``; run on
        micro-batches of ``teacher_batch_size`` samples (each reduced to top-k before the next runs) and, with
        ``cache_teacher``, reused per sample."""
        keys = _sample_keys(inputs) if self.cache_teacher else []
        if keys and all(k in self.teacher_cache for k in keys):
            parts = [self.teacher_cache[k] for k in keys]
            stacked = [torch.stack(items).to(self.device) for items in zip(*parts, strict=True)]
            return tuple(stacked) if self.top_k else stacked[0]
        args, kwargs = call_args(inputs)
        size = next(t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim())
        step = self.teacher_batch_size or size
        chunks = []
        for start in range(0, size, step):
            logits = logits_of(self._run(self.teacher, self._teacher_inputs(rows(inputs, start, start + step))))
            chunks.append(top_k_logits(logits, self.top_k) if self.top_k else (logits.float(),))
        found = [torch.cat(parts) for parts in zip(*chunks, strict=True)]
        if keys:
            for i, key in enumerate(keys):
                self.teacher_cache[key] = tuple(t[i].detach().cpu() for t in found)
        return tuple(found) if self.top_k else found[0]

    def _kd(self, logits: Tensor, teacher: Tensor | tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        """The KD term against full teacher logits or their top-k."""
        if isinstance(teacher, tuple):
            return top_k_kd_loss(logits, *teacher, self.temperature, mask)
        return kd_loss(logits, teacher, self.temperature, mask)

    def _next_tokens(self, logits: Tensor, targets: Tensor, inputs: Any) -> tuple[Tensor, Tensor, Tensor]:
        """A causal LM's shifted logits ``(B, T-1, V)``, targets ``(B, T-1)`` and the mask of real targets."""
        logits, targets = next_token_targets(logits, targets, token_mask(inputs))
        return logits, targets, targets != IGNORE_INDEX

    def losses(self, batch: Any) -> dict[str, Tensor]:
        """``{"loss", "kd", "ce"(, "hidden")}`` for one training batch."""
        inputs, targets = self.split_batch(batch)
        if self.hidden_loss:
            logits, h_s = self._with_hidden(self.student, inputs, list(self.layer_map))
            with torch.no_grad():
                t_inputs = self._teacher_inputs(inputs)
                t_logits, h_t = self._with_hidden(self.teacher, t_inputs, sorted(set(self.layer_map.values())))
            teacher = top_k_logits(t_logits, self.top_k) if self.top_k else t_logits
        else:
            logits, teacher = self(inputs), self._teacher_targets(inputs)
        mask = None
        if self.causal:  # token t predicts token t + 1: every real next token is a sample
            shift = logits.shape[1] - 1
            logits, targets, mask = self._next_tokens(logits, targets, inputs)
            teacher = tuple(t[:, :shift] for t in teacher) if isinstance(teacher, tuple) else teacher[:, :shift]
        ce = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)
        out = {"kd": self._kd(logits, teacher, mask), "ce": ce}
        out["loss"] = self.alpha * out["kd"] + (1 - self.alpha) * out["ce"]
        if self.hidden_loss:
            mask = token_mask(inputs)
            terms = []
            for j, t in self.layer_map.items():
                s = self.projections[str(j)](h_s[j]) if str(j) in self.projections else h_s[j]
                terms.append(hidden_state_loss(s, h_t[t], self.hidden_loss, mask if s.dim() == 3 else None))
            out["hidden"] = torch.stack(terms).mean()
            out["loss"] = out["loss"] + self.hidden_weight * out["hidden"]
        return out

    # ----------------------------------------------------------------------------------- Lightning
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: the student's own ``configure_model`` (a LightningModule that defines one,
        given this module's device mesh) or ``fully_shard`` on each transformer block and the student, on the mesh's
        ``"data_parallel"`` dimension; the projections are sharded either way. A no-op under any other strategy."""
        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        if isinstance(self.student, pl.LightningModule) and is_overridden(
            "configure_model", self.student, pl.LightningModule
        ):
            self.student._device_mesh = self.device_mesh
            self.student.configure_model()
        else:
            linears = [n for n, m in self.student.named_modules() if isinstance(m, nn.Linear)]
            found = find_blocks(self.student, linears)
            for block in found[1] if found is not None else []:
                fully_shard(block, mesh=mesh)
            fully_shard(self.student, mesh=mesh)
        for projection in self.projections.values():
            fully_shard(projection, mesh=mesh)

    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()  # Trainer.fit puts every registered module in train mode; the teacher is not one

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, sync_dist=False)
        return losses["loss"]

    def _evaluate(self, batch: Any, stage: str, metric: torchmetrics.Metric) -> None:
        inputs, targets = self.split_batch(batch)
        logits = self(inputs)
        if self.causal:
            loss, logits, targets = next_token_loss(logits, targets, token_mask(inputs))
            ppl = self.val_ppl if stage == "val" else self.test_ppl
            ppl(logits.float(), targets)
            self.log(f"{stage}/loss", loss, sync_dist=True)
            self.log(f"{stage}/perplexity", ppl, prog_bar=stage == "val")
            return
        metric(logits.argmax(dim=-1), targets)
        self.log(f"{stage}/loss", F.cross_entropy(logits.float(), targets), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs = split_batch(batch)[0]
        return self(inputs)

    def configure_optimizers(self) -> Any:
        """The student's own optimizer configuration when ``lr`` is None, else AdamW with warmup and decay."""
        return self._student_optimizers() if self.lr is None else self._adamw()

    def _student_optimizers(self) -> Any:
        """The student's ``configure_optimizers()``, with the trainable projections added to its first optimizer."""
        self.student.trainer = self.trainer  # Lightning's setter already did; the student may read self.trainer
        config = self.student.configure_optimizers()
        extra = [p for p in self.projections.parameters() if p.requires_grad]
        if extra:
            try:
                add_param_group(config, extra)
            except TypeError as err:
                raise TypeError(
                    f"{type(self.student).__name__}.configure_optimizers() returned no optimizer for the projections "
                    "to join; return one or pass lr to DistillationModule"
                ) from err
        return config

    def _adamw(self) -> dict[str, Any]:
        """AdamW over every trainable parameter at ``lr``, linear warmup then linear decay, stepped per batch."""
        params = [p for p in self.parameters() if p.requires_grad]
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return adamw_warmup_decay(params, self.lr, self.weight_decay, self.warmup_fraction, total)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the student's own weight keys; the projections go to ``checkpoint["distillation"]``. Under an FSDP
        strategy the keys stay the module's (the strategy loads them into this module before any hook runs)."""
        if self._trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            return
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k[len(STUDENT) :]: v for k, v in state.items() if k.startswith(STUDENT)}
        checkpoint["distillation"] = {k: v for k, v in state.items() if not k.startswith(STUDENT)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Undo :meth:`on_save_checkpoint` so the module's own ``load_state_dict`` finds its keys."""
        if "distillation" in checkpoint:
            student = {STUDENT + k: v for k, v in checkpoint["state_dict"].items()}
            checkpoint["state_dict"] = {**student, **checkpoint.pop("distillation")}
