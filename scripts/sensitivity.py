"""Per-layer pruning sensitivity of a model on its validation split, and the per-layer plan it implies.

python scripts/sensitivity.py                            # train the default model briefly, then scan it
python scripts/sensitivity.py ckpt_path=PATH/last.ckpt   # scan a trained checkpoint
python scripts/sensitivity.py target_sparsity=0.9 method=rows

Writes sensitivity.md (the table), sensitivity.png (the curves) and plan.yaml (for IterativePruning(plan=...)).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_compress.callbacks.report import stage_of, write_report
from lightning_compress.sensitivity import evaluate_accuracy, save_plan, sensitivity_scan


@hydra.main(version_base="1.3", config_path="../conf", config_name="sensitivity")
def main(cfg: DictConfig) -> dict[str, float]:
    """Load or train the model, scan every selected layer, write the table, plot and plan; returns the plan."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if cfg.ckpt_path:
        state = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state, strict=True)
    else:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=cfg.train_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
        )
        trainer.fit(model, datamodule=datamodule)
    datamodule.setup("fit")
    evaluate = partial(evaluate_accuracy, batches=datamodule.val_dataloader())
    ratios = OmegaConf.to_container(cfg.ratios)
    targets = OmegaConf.to_container(cfg.targets) if OmegaConf.is_config(cfg.targets) else cfg.targets
    ignore = OmegaConf.to_container(cfg.ignore) if OmegaConf.is_config(cfg.ignore) else cfg.ignore
    result = sensitivity_scan(model, evaluate, ratios, targets=targets, ignore=ignore, method=cfg.method)
    plan = result.plan(cfg.target_sparsity)

    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "sensitivity.md").write_text(result.to_markdown())
    write_report(model, out, [stage_of(model, "scanned model", result.baseline)], "val accuracy", sensitivity=result)
    save_plan(plan, out / "plan.yaml", cfg.target_sparsity)
    print(result.to_markdown())
    print(f"plan for target {cfg.target_sparsity}: " + ", ".join(f"{n}: {r:g}" for n, r in plan.items()))
    print(f"plan sparsity {result.plan_sparsity(plan):.4f}, predicted accuracy drop {result.predicted_loss(plan):.4f}")
    for name in ("sensitivity.md", "sensitivity.png", "plan.yaml", "report.md"):
        print(f"wrote {out / name}")
    return plan


if __name__ == "__main__":
    main()
