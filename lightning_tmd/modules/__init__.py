"""LightningModules, one per role. Free of Hydra."""
