"""Modules and model knowledge built on :mod:`lightning_compress.functional`; no Lightning.

``select`` (layers by name, swapping, undo on error), ``attention`` (attention / MLP layouts), ``quantized`` (the
typed hand-off of quantized weights), ``observers``, ``fake_quant``, ``distributed`` (the one collective helper).
"""
