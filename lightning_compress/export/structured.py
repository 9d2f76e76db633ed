"""Physical structured pruning: remove pruned rows, filters and attention heads for real.

A structured-pruned model keeps its shapes: each pruned output row of a Linear (filter of a conv) is all zero, so
that output channel is a constant (its bias entry, zero when the bias was masked with the row).
:func:`prune_structured` deletes those rows, slices what carries the channel on (BatchNorm parameters and running
statistics, the ``H*W`` block a flatten makes of it) and deletes the matching inputs of the Linear / conv layers
that read it, adding any constant those inputs still carried (e.g. a BatchNorm shift after a pruned filter) to the
reader's bias. The result is a smaller dense model computing the masked model's function in eval mode (BatchNorm is
followed with its running statistics, dropout as the identity).

The data flow comes from a ``torch.fx.symbolic_trace`` of the model, the shapes from one forward pass with example
inputs (``ShapeProp``). A pruned layer stays whole, with a logged warning naming it, when its output reaches anything
else: a residual add or concat, a LayerNorm, an attention reshape, the model output, a grouped conv, a zero-padding
conv while the pruned channels carry a nonzero constant, a module called twice or sharing parameters.

Heads of Hugging Face BERT-style self-attention (``query`` / ``key`` / ``value`` Linear children and
``num_attention_heads`` / ``attention_head_size``; output projection ``<parent>.output.dense``) whose query, key and
value rows are all pruned are removed with the model's own ``PreTrainedModel.prune_heads`` (which records them in
``config.pruned_heads``), else the parent's ``prune_heads``, else by slicing the four projections. Heads of
``torch.nn.MultiheadAttention`` are not removed: its ``embed_dim`` is both the heads' total width and the model
width (``out_proj`` maps back to it), so removing heads would need a different module. Nor are those of Llama-style
attention (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``): its pruned q / k / v rows stay, reported in
``StructuredPlan.skipped``. The layouts come from :mod:`lightning_compress.nn.attention`.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from lightning_compress.nn.attention import AttentionLayout, attention_layouts

logger = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh)
_ACTIVATIONS += (nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_POOLS += (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ELEMENTWISE = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.mish, F.leaky_relu, F.elu, F.hardtanh, F.hardswish}
_ELEMENTWISE |= {torch.tanh, torch.sigmoid, operator.mul, operator.truediv, operator.add, operator.sub, operator.neg}
_ELEMENTWISE |= {torch.mul, torch.add, "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "mul", "div", "add"}
_IDENTITY_FNS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_POOL_FNS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
_POOL_FNS |= {F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_AVG_POOL_FNS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}


@dataclass
class _Flow:
    """The pruned channels along dim ``dim`` of a tensor: ``keep`` (C,) bool, ``fill`` (C,) their constant value."""

    keep: Tensor
    fill: Tensor
    dim: int


@dataclass
class _Edit:
    """Slicing of one module: ``rows`` (out,) / ``cols`` (in,) bool keep-masks; ``fill`` (in,) dropped inputs' value."""

    rows: Tensor | None = None
    cols: Tensor | None = None
    fill: Tensor | None = None


@dataclass
class StructuredPlan:
    """What :func:`prune_structured` removes, decided before the model is touched.

    Attributes:
        removed: layer name -> (rows / filters / heads before, after), for every layer it shrinks.
        skipped: layer name -> why its pruned rows stay (each is also logged as a warning).
        edits: module name -> the slicing it gets (producers' rows, BatchNorms' channels, consumers' inputs).
        heads: self-attention module name -> heads (current indices) to remove.
    """

    removed: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    edits: dict[str, _Edit] = field(default_factory=dict)
    heads: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Graph:
    """The traced model: its modules by name, how often each is called, and those sharing a parameter."""

    modules: dict[str, nn.Module]
    calls: Counter[str]
    shared: set[str]

    def exclusive(self, name: str) -> str | None:
        """Why ``name`` cannot be sliced (called other than once, or shares parameters), or None."""
        if self.calls[name] != 1:
            return f"{name} is called {self.calls[name]} times in forward"
        return f"{name} shares parameters with another module" if name in self.shared else None


def plan_structured(
    model: nn.Module, example_inputs: tuple | Tensor, masks: dict[str, Tensor] | None = None
) -> StructuredPlan:
    """Dry run of :func:`prune_structured`: what it would remove and what it would leave (``model`` is not modified).

    Args:
        model: the structured-pruned model.
        example_inputs: positional inputs of one forward pass (a batch of 1-2 is enough), for the shapes.
        masks: parameter name -> bool keep-mask of that parameter's shape; None reads pruned rows off the weights.

    Returns:
        The plan; ``plan.removed`` maps each layer it shrinks to ``(before, after)`` rows / filters / heads.
    """
    return _plan(copy.deepcopy(model), example_inputs, masks)


def prune_structured(
    model: nn.Module, example_inputs: tuple | Tensor, masks: dict[str, Tensor] | None = None
) -> nn.Module:
    """A smaller dense copy of ``model`` without its pruned rows, filters and attention heads (``model`` is kept).

    A row of a Linear ``(out, in)`` / filter of a conv ``(out, in, *k)`` is pruned when ``masks[f"{name}.weight"]``
    keeps nothing of it, or (``masks=None``) when its weight row and bias entry are all zero. It is removed with the
    inputs that read it downstream, through elementwise ops, dropout, BatchNorm, pooling and flatten / ``view(n, -1)``
    (conv channel ``c`` is input features ``c*H*W .. (c+1)*H*W - 1`` of the next Linear). The copy computes what the
    masked model computes (``weight * mask``, eval mode) up to float rounding. Layers whose rows cannot be followed
    stay whole with a logged warning; the report of what went is logged at INFO and given by :func:`plan_structured`.

    Args:
        model: the structured-pruned model; traced with ``torch.fx.symbolic_trace`` (attention heads need no trace).
        example_inputs: positional inputs of one forward pass, for the shapes.
        masks: parameter name -> bool keep-mask of that parameter's shape, applied to the copy; None reads the
            pruned rows off the weights.

    Returns:
        The pruned copy.

    Raises:
        ValueError: a mask names no parameter or has the wrong shape or dtype.
    """
    pruned = copy.deepcopy(model)
    plan = _plan(pruned, example_inputs, masks)
    _apply(pruned, plan)
    for name, (before, after) in plan.removed.items():
        logger.info("prune_structured: %s %d -> %d", name, before, after)
    return pruned


def _plan(model: nn.Module, example_inputs: tuple | Tensor, masks: dict[str, Tensor] | None) -> StructuredPlan:
    """Apply ``masks`` to ``model`` (a private copy) and plan every removal; nothing is sliced yet."""
    plan = StructuredPlan()
    with torch.no_grad():
        _apply_masks(model, masks)
        excluded = _plan_heads(model, masks, plan)
        todo = {}
        for name, layer in model.named_modules():
            if isinstance(layer, (nn.Linear, *_CONVS)) and name not in excluded:
                keep = _kept_rows(name, layer, masks)
                if not keep.all():
                    todo[name] = keep
        if todo:
            _plan_rows(model, example_inputs, todo, plan)
    for name, why in plan.skipped.items():
        logger.warning("prune_structured: %s keeps its pruned rows: %s", name, why)
    return plan


def _apply_masks(model: nn.Module, masks: dict[str, Tensor] | None) -> None:
    """Check every mask against its parameter, then multiply them in."""
    if masks is None:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, mask in masks.items():
        if key not in params:
            raise ValueError(f"masks[{key!r}]: the model has no parameter of that name")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != params[key].shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"masks[{key!r}] must be a bool tensor of shape {tuple(params[key].shape)}, got {got}")
    for key, mask in masks.items():
        params[key].mul_(mask.to(params[key].device))


def _kept_rows(name: str, layer: nn.Module, masks: dict[str, Tensor] | None) -> Tensor:
    """(out,) bool: the rows of ``layer.weight`` to keep, from its mask or (no masks) its nonzero weights and bias."""
    weight = layer.weight.detach()
    if masks is not None:
        mask = masks.get(f"{name}.weight" if name else "weight")
        if mask is None:
            return torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        return mask.to(weight.device).reshape(weight.shape[0], -1).any(dim=1)
    keep = weight.reshape(weight.shape[0], -1).ne(0).any(dim=1)
    return keep if layer.bias is None else keep | layer.bias.detach().ne(0)


def _plan_rows(model: nn.Module, example_inputs: tuple | Tensor, todo: dict[str, Tensor], plan: StructuredPlan) -> None:
    """Trace ``model`` and plan each layer of ``todo`` (name -> kept rows) whose output can be followed."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # tracing raises anything a forward can; the layers then stay, with the reason
        plan.skipped.update({n: f"torch.fx cannot trace the model ({type(err).__name__}: {err})" for n in todo})
        return
    _propagate_shapes(gm, example_inputs)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    graph = _Graph(dict(model.named_modules()), calls, _shared_modules(model))
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, keep in todo.items():
        edits = _plan_layer(name, keep, nodes.get(name), graph)
        if isinstance(edits, str):
            plan.skipped[name] = edits
            continue
        for target, edit in edits.items():
            merged = plan.edits.setdefault(target, _Edit())
            for attr in ("rows", "cols", "fill"):
                if getattr(edit, attr) is not None:
                    setattr(merged, attr, getattr(edit, attr))
        plan.removed[name] = (keep.numel(), int(keep.sum()))


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple | Tensor) -> None:
    """Record every node's output shape (``node.meta["tensor_meta"]``) from one eval-mode forward pass."""
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        ShapeProp(gm).propagate(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _shared_modules(model: nn.Module) -> set[str]:
    """Names of modules holding a parameter that another module (or the same one under another name) holds too."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The node's output shape from ``ShapeProp``, or None when it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _plan_layer(name: str, keep: Tensor, node: fx.Node | None, graph: _Graph) -> dict[str, _Edit] | str:
    """The edits removing the rows ``~keep`` of layer ``name`` and its readers' inputs, or why it cannot be done."""
    layer, shape = graph.modules[name], None if node is None else _shape(node)
    if shape is None:
        return "it is not called as a module with a tensor output in the traced forward"
    if why := graph.exclusive(name):
        return why
    if not keep.any():
        return "every row is pruned (its output is a constant); remove the layer itself"
    if isinstance(layer, _CONVS) and (layer.groups != 1 or len(shape) != layer.weight.dim()):
        return f"it is a grouped (groups={layer.groups}) or unbatched conv"
    dim = 1 if isinstance(layer, _CONVS) else len(shape) - 1
    fill = torch.zeros_like(keep, dtype=layer.weight.dtype) if layer.bias is None else layer.bias.detach().clone()
    edits = _follow(node, _Flow(keep, fill, dim), graph)
    if not isinstance(edits, str):
        edits[name] = _Edit(rows=keep)
    return edits


def _follow(start: fx.Node, flow: _Flow, graph: _Graph) -> dict[str, _Edit] | str:
    """Walk every path from ``start`` to the Linear / conv layers reading its channels; their edits, or why not."""
    edits: dict[str, _Edit] = {}
    stack = [(start, flow)]
    while stack:
        node, flow = stack.pop()
        for user in node.users:
            step = _advance(user, node, flow, graph, edits)
            if isinstance(step, str):
                what = user.target if user.op == "call_module" else getattr(user.target, "__name__", user.target)
                return f"its output reaches `{what}` ({user.op}), where {step}"
            if step is not None:
                stack.append((user, step))
    return edits


def _advance(user: fx.Node, node: fx.Node, flow: _Flow, graph: _Graph, edits: dict[str, _Edit]) -> _Flow | str | None:
    """The pruned channels after ``user`` (None where it ends, at a reader), or why ``user`` cannot be followed."""
    if user.op == "output":
        return "the model output keeps its size"
    before, after = _shape(node), _shape(user)
    if user.op == "call_method" and user.target == "size":
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        return None if isinstance(dim, int) and dim % len(before) != flow.dim else "it reads the pruned dim's size"
    if after is None:
        return "its output is not a single tensor"
    if user.op == "call_module":
        if user.all_input_nodes != [node] or user.args[0] is not node:
            return "it combines the channels with other tensors"
        module = graph.modules[user.target]
        if not isinstance(module, (nn.Linear, *_CONVS, *_NORMS)):
            return _through_module(module, flow, before, after)
        if why := graph.exclusive(user.target):
            return why
        if isinstance(module, _NORMS):
            return _through_norm(user.target, module, flow, edits)
        return _consume(user.target, module, flow, before, edits)
    if user.op in ("call_function", "call_method"):
        return _through_function(user, node, flow, before, after)
    return "it is not an op that can be followed"


def _through_module(module: nn.Module, flow: _Flow, before: tuple, after: tuple) -> _Flow | str:
    """The pruned channels after an activation, dropout, pooling or flatten module."""
    if isinstance(module, nn.Flatten):
        return _flatten(flow, before, module.start_dim, module.end_dim)
    if isinstance(module, _IDENTITIES + _ACTIVATIONS):
        if after != before:
            return "it changes the shape"
        return flow if isinstance(module, _IDENTITIES) else _Flow(flow.keep, module(flow.fill.clone()), flow.dim)
    if isinstance(module, _POOLS + _AVG_POOLS):
        needs_zero = isinstance(module, _AVG_POOLS) and not _averages_constants(module)
        return _through_pool(flow, before, after, needs_zero)
    return f"{type(module).__name__} is not an op that can be followed"


def _through_function(user: fx.Node, node: fx.Node, flow: _Flow, before: tuple, after: tuple) -> _Flow | str:
    """The pruned channels after a function or method call: elementwise, dropout, pooling, flatten or view."""
    target = user.target
    if target in ("view", "reshape") or target is torch.reshape:
        return _through_view(user, node, flow, before, after)
    if user.all_input_nodes != [node]:
        return "it combines the channels with other tensors"
    if target in _IDENTITY_FNS:
        return flow
    if target in _ELEMENTWISE:
        if after != before:
            return "it broadcasts the channels to another shape"
        args, kwargs = fx.node.map_arg((user.args, user.kwargs), lambda _: flow.fill.clone())
        value = getattr(args[0], target)(*args[1:], **kwargs) if user.op == "call_method" else target(*args, **kwargs)
        return _Flow(flow.keep, value, flow.dim)
    if target in _POOL_FNS or target in _AVG_POOL_FNS:
        return _through_pool(flow, before, after, needs_zero=target in _AVG_POOL_FNS)
    if target is torch.flatten or target == "flatten":
        start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
        end = user.args[2] if len(user.args) > 2 else user.kwargs.get("end_dim", -1)
        return _flatten(flow, before, start, end)
    return "it is not an op that can be followed"


def _through_norm(name: str, norm: nn.Module, flow: _Flow, edits: dict[str, _Edit]) -> _Flow | str:
    """Slice a BatchNorm with the channels; the pruned channels' constant goes through its running statistics."""
    if flow.dim != 1 or norm.running_mean is None:
        return "it normalizes another dim or keeps no running statistics"
    edits[name] = _Edit(rows=flow.keep)
    stats = (norm.running_mean, norm.running_var, norm.weight, norm.bias)
    return _Flow(flow.keep, F.batch_norm(flow.fill[None], *stats, False, 0.0, norm.eps)[0], 1)


def _through_pool(flow: _Flow, before: tuple, after: tuple, needs_zero: bool) -> _Flow | str:
    """Pooling keeps the channels, and a constant channel's value unless it averages in padding."""
    if flow.dim != 1 or len(before) < 3 or after[:2] != before[:2]:
        return "it pools over the pruned dim"
    if needs_zero and _carries_constant(flow):
        return "it averages padding into the pruned channels' nonzero constant"
    return flow


def _through_view(user: fx.Node, node: fx.Node, flow: _Flow, before: tuple, after: tuple) -> _Flow | str:
    """``x.view(n, -1)`` / ``reshape``: followed when it flattens the pruned dim and every dim after it."""
    sizes = user.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    start = len(after) - 1
    if user.args[0] is not node or not sizes or sizes[-1] != -1 or start > flow.dim or after[:start] != before[:start]:
        return "it reshapes the pruned dim other than as `view(n, -1)`"
    return _flatten(flow, before, start, -1)


def _flatten(flow: _Flow, shape: tuple, start: int, end: int) -> _Flow:
    """Flatten dims ``start..end`` of a tensor of ``shape``: channel ``c`` becomes a block of consecutive features."""
    start, end = start % len(shape), end % len(shape)
    if flow.dim < start:
        return flow
    if flow.dim > end:
        return _Flow(flow.keep, flow.fill, flow.dim - (end - start))
    block = shape[start : end + 1]
    view = [1] * len(block)
    view[flow.dim - start] = -1
    keep, fill = (t.view(view).expand(block).reshape(-1) for t in (flow.keep, flow.fill))
    return _Flow(keep, fill, start)


def _consume(name: str, layer: nn.Module, flow: _Flow, shape: tuple, edits: dict[str, _Edit]) -> str | None:
    """Record that ``layer`` loses the inputs ``~flow.keep``, or say why it cannot."""
    if isinstance(layer, nn.Linear):
        if flow.dim != len(shape) - 1:
            return "the pruned dim is not its input-feature dim"
    elif layer.groups != 1 or flow.dim != 1 or len(shape) != layer.weight.dim():
        return f"it is a grouped (groups={layer.groups}) conv or does not read the pruned dim as its channels"
    elif _carries_constant(flow) and layer.padding_mode == "zeros" and _pads(layer.padding):
        return "it zero-pads while the pruned channels carry a nonzero constant (e.g. a BatchNorm shift; mask that too)"
    edits[name] = _Edit(cols=flow.keep, fill=flow.fill)
    return None


def _carries_constant(flow: _Flow) -> bool:
    """Whether any pruned channel holds a nonzero value."""
    return bool(flow.fill[~flow.keep].ne(0).any())


def _pads(padding: str | int | tuple) -> bool:
    """Whether a conv / pool ``padding`` adds any padding."""
    if isinstance(padding, str):
        return padding != "valid"
    return any(padding) if isinstance(padding, tuple) else bool(padding)


def _averages_constants(pool: nn.Module) -> bool:
    """Whether an AvgPool maps a constant channel to the same constant (no padding, ceil mode or divisor override)."""
    return not _pads(pool.padding) and not pool.ceil_mode and getattr(pool, "divisor_override", None) is None


def _apply(model: nn.Module, plan: StructuredPlan) -> None:
    """Carry out ``plan`` on ``model`` in place."""
    with torch.no_grad():
        for name, edit in plan.edits.items():
            module = model.get_submodule(name)
            (_slice_norm if isinstance(module, _NORMS) else _slice_layer)(module, edit)
        for name, heads in plan.heads.items():
            _remove_heads(model, name, heads)


def _fold(weight: Tensor, bias: Tensor | None, dropped: Tensor, fill: Tensor) -> Tensor | None:
    """Bias after dropping inputs ``dropped`` that held constants ``fill``: ``b + sum_k W[:, dropped, k] @ fill``."""
    value = fill[dropped].to(weight)
    if not value.any():
        return bias
    shift = weight[:, dropped].reshape(weight.shape[0], value.numel(), -1).sum(-1) @ value
    return shift if bias is None else bias + shift


def _slice_layer(layer: nn.Module, edit: _Edit) -> None:
    """Keep rows ``edit.rows`` and input columns / channels ``edit.cols`` of a Linear or conv, folding ``edit.fill``."""
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    if edit.cols is not None:
        bias = _fold(weight, bias, ~edit.cols, edit.fill)
        weight = weight[:, edit.cols]
    if edit.rows is not None:
        weight, bias = weight[edit.rows], None if bias is None else bias[edit.rows]
    grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(weight.clone(), requires_grad=grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=grad if layer.bias is None else layer.bias.requires_grad)
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = weight.shape
    else:
        layer.out_channels, layer.in_channels = weight.shape[:2]


def _slice_norm(norm: nn.Module, edit: _Edit) -> None:
    """Keep channels ``edit.rows`` of a BatchNorm: affine parameters, running statistics and ``num_features``."""
    for attr in ("weight", "bias"):
        p = getattr(norm, attr)
        if p is not None:
            setattr(norm, attr, nn.Parameter(p.detach()[edit.rows].clone(), requires_grad=p.requires_grad))
    norm.running_mean = norm.running_mean[edit.rows].clone()
    norm.running_var = norm.running_var[edit.rows].clone()
    norm.num_features = int(edit.rows.sum())


def _plan_heads(model: nn.Module, masks: dict[str, Tensor] | None, plan: StructuredPlan) -> set[str]:
    """Plan the heads of every BERT-style self-attention whose q / k / v rows are all pruned.

    Llama-style attention (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``) keeps its heads: pruned q / k / v rows
    are reported in ``plan.skipped``. ``nn.MultiheadAttention`` is left to the row planning (see the module
    docstring).

    Returns:
        Names of the projections attention owns (query, key, value, output.dense; q_proj, k_proj, v_proj), which
        rows pruning leaves alone.
    """
    excluded: set[str] = set()
    for name, layout in attention_layouts(model).items():
        if not name or layout.kind == "mha":
            continue
        if layout.kind == "llama":
            excluded.update(layout.projections)
            if any(rows.any() for rows in _pruned_projection_rows(model, layout, masks)):
                plan.skipped[name] = (
                    "heads of Llama-style q_proj / k_proj / v_proj / o_proj attention are not removed "
                    "(only BERT-style self-attention heads are); its pruned q / k / v rows stay"
                )
            continue
        if hasattr(model.get_submodule(name), "num_attention_heads"):  # the count removal rewrites
            excluded.update(_plan_bert_heads(model, layout, masks, plan))
    return excluded


def _pruned_projection_rows(model: nn.Module, layout: AttentionLayout, masks: dict[str, Tensor] | None) -> list[Tensor]:
    """(rows,) bool each: the pruned rows of the query, key and value projections of ``layout``."""
    return [~_kept_rows(p, model.get_submodule(p), masks).cpu() for p in layout.projections]


def _plan_bert_heads(
    model: nn.Module, layout: AttentionLayout, masks: dict[str, Tensor] | None, plan: StructuredPlan
) -> list[str]:
    """Plan removing the whole pruned heads of BERT-style self-attention ``layout``; the projections it owns."""
    name, parent = layout.name, layout.name.rpartition(".")[0]
    owned = [*layout.projections, f"{parent}.output.dense".lstrip(".")]
    n, d = layout.num_heads, layout.head_size
    pruned = torch.stack(_pruned_projection_rows(model, layout, masks))
    if not pruned.any():
        return owned
    if layout.output is None or layout.mismatch(model):
        plan.skipped[name] = f"its q / k / v / {parent}.output.dense are not {n} heads of {d} features"
        return owned
    gone = pruned.all(dim=0).view(n, d).all(dim=1)
    if (pruned.any(dim=0) & ~gone.repeat_interleave(d)).any():
        plan.skipped[name] = "query / key / value rows that do not make up whole heads (pruned in all three) stay"
    if gone.all():
        plan.skipped[name] = "every head is pruned; remove the attention block itself"
    elif gone.any():
        plan.heads[name] = gone.nonzero().flatten().tolist()
        plan.removed[name] = (n, n - int(gone.sum()))
    return owned


def _remove_heads(model: nn.Module, name: str, heads: list[int]) -> None:
    """Remove ``heads`` of self-attention ``name``, with ``prune_heads`` where the model has it.

    The removed heads attend with zero query and key weights, so uniformly, and return their value bias ``b_v``;
    ``W_o[:, head] @ b_v[head]`` goes into the output projection's bias first.
    """
    att, parent = model.get_submodule(name), model.get_submodule(name.rpartition(".")[0])
    dense, n, d = parent.output.dense, int(att.num_attention_heads), int(att.attention_head_size)
    gone = torch.zeros(n, dtype=torch.bool, device=dense.weight.device)
    gone[heads] = True
    gone = gone.repeat_interleave(d)
    if att.value.bias is not None and (bias := _fold(dense.weight, dense.bias, gone, att.value.bias)) is not None:
        dense.bias = nn.Parameter(bias.detach().clone(), requires_grad=dense.weight.requires_grad)
    done = sorted(getattr(parent, "pruned_heads", ()))
    original = [h for h in range(n + len(done)) if h not in done]
    original = [original[h] for h in heads]
    owner, layer = _hf_owner(model, name)
    if owner is not None:
        owner.prune_heads({layer: original})
    elif callable(getattr(parent, "prune_heads", None)):
        parent.prune_heads(original)
    else:
        for proj in (att.query, att.key, att.value):
            _slice_layer(proj, _Edit(rows=~gone))
        _slice_layer(dense, _Edit(cols=~gone, fill=torch.zeros_like(dense.weight[0])))
        att.num_attention_heads = n - len(heads)
        if hasattr(att, "all_head_size"):
            att.all_head_size = att.num_attention_heads * d
    if att.num_attention_heads != n - len(heads) or att.query.out_features != (n - len(heads)) * d:
        raise RuntimeError(f"removing heads {heads} of {name} left {att.num_attention_heads} heads")


def _hf_owner(model: nn.Module, name: str) -> tuple[nn.Module | None, int]:
    """The outermost Hugging Face ``PreTrainedModel`` holding module ``name`` and ``name``'s layer index in it.

    ``(None, -1)`` without transformers, outside such a model, or when the path has no single layer index.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None, -1
    for prefix, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and name.startswith(f"{prefix}." if prefix else ""):
            indices = [int(p) for p in name[len(prefix) :].split(".") if p.isdigit()]
            ok = len(indices) == 1 and callable(getattr(module, "prune_heads", None))
            return (module, indices[0]) if ok else (None, -1)
    return None, -1
