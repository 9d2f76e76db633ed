"""Modules built on :mod:`lightning_compress.functional` (fake-quant, observers, export layers)."""
