"""lightning_compress: pruning, quantization and distillation for PyTorch Lightning.

Public API (grows with each feature): :class:`IterativePruning`, :class:`QATFakeQuant`,
:class:`SmoothQuantCalibrate`, :class:`GPTQFinalize`, :class:`CompressionReport`, :func:`compression_summary`,
:class:`DistillationModule`, :func:`export_for_inference`, :func:`save_exported`, :func:`load_exported`.
"""

from lightning_compress.callbacks.gptq import GPTQFinalize
from lightning_compress.callbacks.pruning import IterativePruning
from lightning_compress.callbacks.qat import QATFakeQuant
from lightning_compress.callbacks.report import CompressionReport
from lightning_compress.callbacks.smoothquant import SmoothQuantCalibrate
from lightning_compress.distillation import DistillationModule
from lightning_compress.export import export_for_inference, load_exported, save_exported
from lightning_compress.summary import CompressionSummary, compression_summary

__all__ = [
    "CompressionReport",
    "CompressionSummary",
    "DistillationModule",
    "GPTQFinalize",
    "IterativePruning",
    "QATFakeQuant",
    "SmoothQuantCalibrate",
    "compression_summary",
    "export_for_inference",
    "load_exported",
    "save_exported",
]
__version__ = "0.1.0"
