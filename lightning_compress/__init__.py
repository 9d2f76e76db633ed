"""lightning_compress: pruning, quantization and distillation for PyTorch Lightning.

Public API: :class:`AutoCompress`, :class:`IterativePruning`, :class:`QATFakeQuant`, :class:`SmoothQuantCalibrate`,
:class:`GPTQFinalize`, :class:`AWQCalibrate`, :class:`WandaPrune`, :class:`SparseGPTPrune`, :class:`CompressionReport`,
:func:`compression_summary`, :class:`DistillationModule`, :func:`export_for_inference`, :func:`save_exported`,
:func:`load_exported`. Each is imported on first use (PEP 562), so tools that need none of them
(``python -m lightning_compress.size``) start without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_compress.callbacks.auto import AutoCompress
    from lightning_compress.callbacks.awq import AWQCalibrate
    from lightning_compress.callbacks.gptq import GPTQFinalize
    from lightning_compress.callbacks.pruning import IterativePruning
    from lightning_compress.callbacks.qat import QATFakeQuant
    from lightning_compress.callbacks.report import CompressionReport
    from lightning_compress.callbacks.smoothquant import SmoothQuantCalibrate
    from lightning_compress.callbacks.sparsegpt import SparseGPTPrune
    from lightning_compress.callbacks.wanda import WandaPrune
    from lightning_compress.distillation import DistillationModule
    from lightning_compress.export.io import load_exported, save_exported
    from lightning_compress.export.plan import export_for_inference
    from lightning_compress.summary import CompressionSummary, compression_summary

_HOMES = {
    "AutoCompress": "lightning_compress.callbacks.auto",
    "AWQCalibrate": "lightning_compress.callbacks.awq",
    "CompressionReport": "lightning_compress.callbacks.report",
    "CompressionSummary": "lightning_compress.summary",
    "DistillationModule": "lightning_compress.distillation",
    "GPTQFinalize": "lightning_compress.callbacks.gptq",
    "IterativePruning": "lightning_compress.callbacks.pruning",
    "QATFakeQuant": "lightning_compress.callbacks.qat",
    "SmoothQuantCalibrate": "lightning_compress.callbacks.smoothquant",
    "SparseGPTPrune": "lightning_compress.callbacks.sparsegpt",
    "WandaPrune": "lightning_compress.callbacks.wanda",
    "compression_summary": "lightning_compress.summary",
    "export_for_inference": "lightning_compress.export.plan",
    "load_exported": "lightning_compress.export.io",
    "save_exported": "lightning_compress.export.io",
}
__all__ = [  # the keys of _HOMES, spelled out for linters and readers
    "AutoCompress",
    "AWQCalibrate",
    "CompressionReport",
    "CompressionSummary",
    "DistillationModule",
    "GPTQFinalize",
    "IterativePruning",
    "QATFakeQuant",
    "SmoothQuantCalibrate",
    "SparseGPTPrune",
    "WandaPrune",
    "compression_summary",
    "export_for_inference",
    "load_exported",
    "save_exported",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access."""
    if name not in _HOMES:
        raise AttributeError(f"module 'lightning_compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
