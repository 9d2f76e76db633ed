"""Shared fixtures and the `gpu` marker's skip rule."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20·log10(‖x‖ / ‖x − y‖) in dB."""
    return float(20 * torch.log10(x.norm() / (x - y).norm()))
