"""Export a checkpoint trained with a recipe into real inference layers, composed by Hydra.

python scripts/export.py +compress=qat_int8 ckpt_path=PATH/last.ckpt
python scripts/export.py +compress=[prune_24,qat_int8] ckpt_path=PATH/last.ckpt export.dtype=bfloat16
python scripts/export.py +compress=qat_int4 ckpt_path=PATH/last.ckpt export.format=compressed-tensors

The Trainer restores the checkpoint with the recipe's callbacks (so fake-quant layers, scales and masks come back
exactly) and stops at once; fit end converts QAT layers and runs the post-training recipes. The model is then
exported, checked against its fake-quant self on a test batch, and saved. With ``export.format=compressed-tensors``
(or ``gguf``) the transformers model inside the LightningModule is written as is, for a serving stack, instead.
"""

from __future__ import annotations

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_compress.calibration.batches import call_model, split_batch
from lightning_compress.callbacks.report import stage_of, weight_snapshots, write_report
from lightning_compress.export.io import save_exported
from lightning_compress.export.plan import export_for_inference
from lightning_compress.export.serving import check_serving_format, save_for_serving, transformers_model


def restore(cfg: DictConfig) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The model as the recipe left it at the end of training, from ``cfg.ckpt_path``."""
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.Checkpoint)]
    step = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False)["global_step"]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, max_steps=max(step, 1), max_epochs=-1, logger=False,
                          enable_checkpointing=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    return model, datamodule


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> float:
    """Restore, export, compare with the fake-quant model on one test batch, save; returns the output cosine
    (1.0 for a serving format: the compressed model itself is written)."""
    options = OmegaConf.to_container(cfg.export)
    fmt = check_serving_format(options.pop("format", None))
    pl.seed_everything(cfg.seed, workers=True)
    model, datamodule = restore(cfg)
    if fmt is not None:
        path = save_for_serving(transformers_model(model), fmt, cfg.out_dir, getattr(datamodule, "tokenizer", None))
        print(f"{fmt} checkpoint: {path}")
        return 1.0
    datamodule.setup("test")
    inputs = split_batch(next(iter(datamodule.test_dataloader())))[0]
    model.eval()
    snapshots, compressed = weight_snapshots(model), stage_of(model, "compressed (fake-quant / masked)", 1.0)
    with torch.no_grad():
        before = call_model(model, inputs).float()
        export_for_inference(model, example_inputs=inputs, **options)
        after = call_model(model, inputs).float()
    cosine = float(torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0))
    same = int((before.argmax(-1) == after.argmax(-1)).sum()) if before.dim() == 2 else None
    path = save_exported(model, cfg.out_dir)
    stages = [compressed, stage_of(model, "exported", cosine)]
    extra = "## Export\n\n" + model.export_report.to_markdown()
    write_report(model, HydraConfig.get().runtime.output_dir, stages, "output cosine", snapshots, extra=extra)
    print(model.export_report.to_markdown())
    agreement = "n/a (not a classifier)" if same is None else f"{same / len(before):.4f} ({same} of {len(before)})"
    print(f"output cosine to the compressed model: {cosine:.6f}; top-1 agreement {agreement}")
    print(f"exported to {path}")
    return cosine


if __name__ == "__main__":
    main()
