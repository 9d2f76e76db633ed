"""Where a transformer keeps its attention heads and MLP projections: one place for that model knowledge.

Three attention layouts are recognised, by module structure (no class names, so subclasses and look-alikes work):

* ``"mha"``: :class:`torch.nn.MultiheadAttention` with a packed ``in_proj_weight`` ``(3 * E, E)`` (query, key and
  value stacked along dim 0) and ``out_proj`` ``(E, E)``; ``E = num_heads * head_dim``.
* ``"bert"``: Hugging Face BERT-style self-attention (``BertSelfAttention``, RoBERTa, DistilBERT-like encoders):
  ``query`` / ``key`` / ``value`` Linear children ``(heads * head_size, hidden)``, an int ``attention_head_size``
  and usually ``num_attention_heads``; the output projection ``(hidden, heads * head_size)`` is
  ``<parent>.output.dense`` (``BertAttention.output.dense``).
* ``"llama"``: ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` Linear children (transformers' ``LlamaAttention``,
  ``MistralAttention``, ``Qwen2Attention``, ...), with ``head_dim`` and the head counts read from the module
  (``num_heads``, ``num_key_value_heads``) or its ``config`` (``num_attention_heads``, ``num_key_value_heads``,
  ``head_dim``). ``q_proj`` is ``(heads * head_dim, hidden)``, ``k_proj`` / ``v_proj`` are
  ``(kv_heads * head_dim, hidden)`` (fewer rows under grouped-query attention), ``o_proj`` is
  ``(hidden, heads * head_dim)``.

MLP blocks: ``"llama"`` (``gate_proj`` / ``up_proj`` / ``down_proj`` children, ``down(act(gate(x)) * up(x))``) and
``"bert"`` (a layer with ``intermediate.dense`` and ``output.dense``).

Imports torch only; the callbacks, export and calibration code read layouts from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

AttentionKind = Literal["mha", "bert", "llama"]
MLPKind = Literal["llama", "bert"]

_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_BERT_PROJECTIONS = ("query", "key", "value")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention module keeps its heads.

    Attributes:
        name: qualified name of the attention module (as in ``model.named_modules()``).
        kind: ``"mha"``, ``"bert"`` or ``"llama"`` (see the module docstring).
        query, key, value: qualified names of the q / k / v projection Linears, rows ``(heads * head_size)``
            first; None for ``"mha"``, whose packed weight is :attr:`in_proj`.
        output: qualified name of the output projection Linear, columns ``(heads * head_size)`` last; None when
            a BERT-style self-attention has no ``<parent>.output.dense``.
        num_heads: query heads.
        num_kv_heads: key / value heads; fewer than ``num_heads`` under grouped-query attention.
        head_size: features per head.
    """

    name: str
    kind: AttentionKind
    query: str | None
    key: str | None
    value: str | None
    output: str | None
    num_heads: int
    num_kv_heads: int
    head_size: int

    @property
    def grouped(self) -> bool:
        """Whether key / value heads are shared by several query heads (grouped-query or multi-query attention)."""
        return self.num_kv_heads != self.num_heads

    @property
    def in_proj(self) -> str | None:
        """Qualified name of the packed ``(3 * E, E)`` q / k / v weight of ``"mha"``; None for other kinds."""
        return _join(self.name, "in_proj_weight") if self.kind == "mha" else None

    @property
    def projections(self) -> tuple[str, ...]:
        """Qualified names of the q / k / v Linears (empty for ``"mha"``)."""
        return tuple(p for p in (self.query, self.key, self.value) if p is not None)

    def mismatch(self, model: nn.Module) -> str | None:
        """Why the projections of ``model`` do not hold these heads, or None when their shapes agree.

        Args:
            model: the model this layout was read from (possibly since resized).

        Returns:
            A sentence naming the first projection whose head dimension is not ``heads * head_size``, or None.
        """
        if self.kind == "mha":
            return None
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        wanted = [(self.query, "out_features", q), (self.key, "out_features", kv), (self.value, "out_features", kv)]
        if self.output is not None:
            wanted.append((self.output, "in_features", q))
        for proj, attr, size in wanted:
            got = getattr(model.get_submodule(proj), attr)
            if got != size:
                return f"{proj} has {attr}={got}, expected {size} ({size // self.head_size} heads of {self.head_size})"
        return None


@dataclass(frozen=True)
class MLPLayout:
    """Where one transformer MLP block keeps its projections.

    Attributes:
        name: qualified name of the block: the ``mlp`` module for ``"llama"``, the layer for ``"bert"``.
        kind: ``"llama"`` (gated: ``down(act(gate(x)) * up(x))``) or ``"bert"`` (``output(act(intermediate(x)))``).
        inputs: qualified names of the Linears reading the block input ``(intermediate, hidden)``:
            ``(gate_proj, up_proj)`` or ``(intermediate.dense,)``.
        output: qualified name of the Linear ``(hidden, intermediate)`` writing the block output: ``down_proj`` or
            ``output.dense``.
        intermediate_size: width of the hidden activation between them.
    """

    name: str
    kind: MLPKind
    inputs: tuple[str, ...]
    output: str
    intermediate_size: int


def attention_kind(module: nn.Module) -> AttentionKind | None:
    """The attention layout ``module`` has (``"mha"``, ``"bert"``, ``"llama"``), or None when it is none of them.

    Decided from ``module`` alone, so usable as a selection filter; :func:`attention_layout` needs the model too
    (a BERT output projection lives in the parent).
    """
    if isinstance(module, nn.MultiheadAttention):
        return "mha" if module._qkv_same_embed_dim else None
    if _linears(module, _BERT_PROJECTIONS) and _bert_heads(module) is not None:
        return "bert"
    if _linears(module, _LLAMA_PROJECTIONS) and _llama_heads(module) is not None:
        return "llama"
    return None


def attention_layout(model: nn.Module, name: str, module: nn.Module | None = None) -> AttentionLayout | None:
    """The layout of attention module ``name`` of ``model``, or None when it is not an attention module.

    Args:
        model: the model holding the module (the BERT output projection is found through the module's parent).
        name: qualified name of the module in ``model`` (``""`` for ``model`` itself).
        module: the module, when the caller has it; else ``model.get_submodule(name)``.

    Returns:
        The layout; head counts as the module / its config declare them (check shapes with
        :meth:`AttentionLayout.mismatch`).
    """
    module = model.get_submodule(name) if module is None else module
    kind = attention_kind(module)
    if kind == "mha":
        e, n = module.embed_dim, module.num_heads
        return AttentionLayout(name, kind, None, None, None, _join(name, "out_proj"), n, n, e // n)
    if kind == "bert":
        q, k, v = (_join(name, p) for p in _BERT_PROJECTIONS)
        n, d = _bert_heads(module)
        return AttentionLayout(name, kind, q, k, v, _bert_output(model, name), n, n, d)
    if kind == "llama":
        q, k, v, o = (_join(name, p) for p in _LLAMA_PROJECTIONS)
        n, kv, d = _llama_heads(module)
        return AttentionLayout(name, kind, q, k, v, o, n, kv, d)
    return None


def attention_layouts(model: nn.Module) -> dict[str, AttentionLayout]:
    """Every attention module of ``model``: ``{name: layout}`` in ``named_modules()`` order (empty when none)."""
    found = (attention_layout(model, name, module) for name, module in model.named_modules())
    return {layout.name: layout for layout in found if layout is not None}


def mlp_layout(model: nn.Module, name: str, module: nn.Module | None = None) -> MLPLayout | None:
    """The layout of MLP block ``name`` of ``model``, or None when it is not one.

    A block is recognised when its Linears chain up: ``gate_proj`` and ``up_proj`` ``(I, H)`` with ``down_proj``
    ``(H, I)`` (Llama, Mistral, Qwen2, Gemma), or ``intermediate.dense`` ``(I, H)`` with ``output.dense`` ``(H, I)``
    (a BERT layer; ``BertAttention``, with ``output.dense`` but no ``intermediate``, is not one).

    Args:
        model: the model holding the block.
        name: qualified name of the block in ``model``.
        module: the block, when the caller has it; else ``model.get_submodule(name)``.
    """
    module = model.get_submodule(name) if module is None else module
    if _linears(module, _LLAMA_MLP):
        gate, up, down = (getattr(module, p) for p in _LLAMA_MLP)
        if gate.out_features == up.out_features == down.in_features:
            inputs = (_join(name, "gate_proj"), _join(name, "up_proj"))
            return MLPLayout(name, "llama", inputs, _join(name, "down_proj"), down.in_features)
    first = getattr(getattr(module, "intermediate", None), "dense", None)
    second = getattr(getattr(module, "output", None), "dense", None)
    if isinstance(first, nn.Linear) and isinstance(second, nn.Linear) and first.out_features == second.in_features:
        inputs = (_join(name, "intermediate.dense"),)
        return MLPLayout(name, "bert", inputs, _join(name, "output.dense"), second.in_features)
    return None


def mlp_layouts(model: nn.Module) -> dict[str, MLPLayout]:
    """Every MLP block of ``model``: ``{name: layout}`` in ``named_modules()`` order (empty when none)."""
    found = (mlp_layout(model, name, module) for name, module in model.named_modules())
    return {layout.name: layout for layout in found if layout is not None}


def _join(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` when ``prefix`` is the root (``""``)."""
    return f"{prefix}.{name}" if prefix else name


def _linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether every one of ``names`` is a Linear child of ``module``."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _count(owner: object, attr: str) -> int | None:
    """``owner.attr`` when it is a positive int (not a bool), else None."""
    value = getattr(owner, attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _bert_heads(module: nn.Module) -> tuple[int, int] | None:
    """``(heads, head_size)`` of BERT-style self-attention: ``attention_head_size`` and ``num_attention_heads``
    (counted from ``query`` when absent), or None without an int ``attention_head_size``."""
    size = _count(module, "attention_head_size")
    if size is None:
        return None
    return _count(module, "num_attention_heads") or module.query.out_features // size, size


def _llama_heads(module: nn.Module) -> tuple[int, int, int] | None:
    """``(heads, kv_heads, head_dim)`` of q_proj / k_proj / v_proj / o_proj attention, or None when not declared.

    Each is read from the module (``num_heads``, ``num_key_value_heads``, ``head_dim``; older transformers), else
    its ``config`` (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``), else derived: ``head_dim``
    from ``hidden_size / heads``, head counts from the ``q_proj`` / ``k_proj`` rows.
    """
    config = getattr(module, "config", None)
    heads = _count(module, "num_heads") or _count(config, "num_attention_heads")
    size = _count(module, "head_dim") or _count(config, "head_dim")
    if size is None and heads is not None and _count(config, "hidden_size"):
        size = config.hidden_size // heads or None
    if size is None:
        return None
    heads = heads or module.q_proj.out_features // size
    groups = _count(module, "num_key_value_groups")
    kv = _count(module, "num_key_value_heads") or _count(config, "num_key_value_heads")
    kv = kv or (heads // groups if groups else module.k_proj.out_features // size)
    return heads, kv, size


def _bert_output(model: nn.Module, name: str) -> str | None:
    """``<parent>.output.dense`` of BERT-style self-attention ``name`` when it is a Linear, else None."""
    if not name:
        return None
    parent = name.rpartition(".")[0]
    dense = getattr(getattr(model.get_submodule(parent), "output", None), "dense", None)
    return _join(parent, "output.dense") if isinstance(dense, nn.Linear) else None
