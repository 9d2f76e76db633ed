"""Fixtures shared by the export tests."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_compress import QATFakeQuant
from lightning_compress.examples.images import DigitsDataModule
from lightning_compress.examples.models import ImageClassifier, SmallCNN


@pytest.fixture(scope="module")
def qat_cnn() -> tuple[ImageClassifier, torch.Tensor]:
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN())
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[QATFakeQuant(bits=8, act_bits=8)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    dm = DigitsDataModule()
    trainer.fit(model, dm)
    x = torch.cat([b[0] for b in dm.test_dataloader()])
    return model.eval(), x
