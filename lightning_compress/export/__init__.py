"""Export for inference: what each layer becomes (``plan``), the inference layers and their kernels (``layer``,
``int8_linear``, ``int4_linear``, ``sparse_linear``), the kernel self-check (``selfcheck``), files (``io``), and
physical structured pruning (``structured``). No Lightning."""

from lightning_compress.export.io import exported_layers, load_exported, save_exported
from lightning_compress.export.plan import export_for_inference
from lightning_compress.export.selfcheck import ExportReport

__all__ = ["ExportReport", "export_for_inference", "exported_layers", "load_exported", "save_exported"]
