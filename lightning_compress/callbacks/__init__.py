"""The Lightning layer: which layers, when, and what state to keep. The math lives in ``functional``."""

from lightning_compress.callbacks.base import select_layers
from lightning_compress.callbacks.report import CompressionReport

__all__ = ["CompressionReport", "select_layers"]
