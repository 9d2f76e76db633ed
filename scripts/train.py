"""Train a model with compression callbacks, composed by Hydra.

python scripts/train.py                          # default model on the bundled digits
python scripts/train.py +compress=NAME           # add a recipe from conf/compress/
python scripts/train.py ckpt_path=PATH/last.ckpt # resume where a run stopped
"""

from __future__ import annotations

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_compress.callbacks.report import CompressionReport
from lightning_compress.summary import compression_summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    """Fit, test, and print the test metrics and the compression summary; returns the test metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0] if cfg.test else {}
    if trainer.is_global_zero:
        for key, value in metrics.items():
            print(f"{key}: {value:.4f}")
        reports = [c for c in callbacks if isinstance(c, CompressionReport)]
        print(reports[0].to_markdown() if reports else compression_summary(model).to_markdown())
        if reports:
            print(f"summary written to {reports[0].path(trainer)}")
    return metrics


if __name__ == "__main__":
    main()
