"""The Hydra configs, installed as the package `lightning_tmd.conf` (see pyproject.toml)."""
