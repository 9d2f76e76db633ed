"""Train a model with compression callbacks, composed by Hydra.

python scripts/train.py                          # default model on the bundled digits
python scripts/train.py +compress=NAME           # add a recipe from conf/compress/
python scripts/train.py ckpt_path=PATH/last.ckpt # resume where a run stopped
python scripts/train.py experiment=distill_minilm  # fine-tune a BERT teacher, then distill a 3-layer student
python scripts/train.py experiment=qat_smollm2     # GPTQ int4 SmolLM2, refined by QAT + distillation from FP32
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_compress.callbacks.report import CompressionReport
from lightning_compress.summary import compression_summary


def fit_teacher(cfg: DictConfig, teacher: pl.LightningModule, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """Fine-tune the teacher for ``cfg.teacher.max_epochs`` (or load ``cfg.teacher.ckpt_path`` when it exists) and
    print its test metrics; the checkpoint is written to ``cfg.teacher.ckpt_path``. ``max_epochs: 0`` keeps the
    teacher as it is (a pretrained model teaching its own quantized copy)."""
    path = Path(cfg.teacher.ckpt_path) if cfg.teacher.get("ckpt_path") else None
    trainer = instantiate(cfg.trainer, max_epochs=cfg.teacher.max_epochs, max_steps=-1, callbacks=[], logger=False,
                          enable_checkpointing=False)  # fmt: skip
    if cfg.teacher.max_epochs > 0 and path is not None and path.is_file():
        teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    elif cfg.teacher.max_epochs > 0:
        trainer.fit(teacher, datamodule=datamodule)
        if path is not None:
            trainer.save_checkpoint(path)
    metrics = trainer.test(teacher, datamodule=datamodule, verbose=False)[0] if cfg.test else {}
    if trainer.is_global_zero:
        for key, value in metrics.items():
            print(f"teacher {key}: {value:.4f}")
    return teacher


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    """Fit, test, and print the test metrics and the compression summary; returns the test metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if cfg.get("teacher") is not None:  # distillation: the model above is the teacher; fit (or load) it first
        teacher = fit_teacher(cfg, model, datamodule)
        model = instantiate(cfg.distillation, teacher=teacher)
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
