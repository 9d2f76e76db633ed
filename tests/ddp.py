"""Helpers for the two-process ``ddp_spawn`` tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch.distributed as dist


class CloseProcessGroup(pl.Callback):
    """At the end of a spawned worker's fit, wait for every rank and destroy the gloo process group together.

    Without it a rank can exit (and tear gloo down from ``atexit``) while the other still holds the group; under
    pytest's output capture the worker then aborts ("terminate called without an active exception") in about one run
    of four, after the fit itself has succeeded. Harmless outside distributed runs.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
