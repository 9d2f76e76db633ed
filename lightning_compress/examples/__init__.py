"""The example models and data modules that the default job and the recipes use (any LightningModule works)."""
