"""What the Hydra apps (train, pipeline, sample, evaluate, export, preprocess) share: where their configs are."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """The folder of the Hydra configs: `lightning_tmd/conf` in an installed wheel (the package
    `lightning_tmd.conf`), else `conf/` beside the package in a source checkout (editable install or not)."""
    package = Path(__file__).resolve().parent
    for folder in (package / "conf", package.parent / "conf"):
        if (folder / "train.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no Hydra configs (train.yaml) in {package / 'conf'} or {package.parent / 'conf'}: "
                            "reinstall lightning-tmd")


CONFIG_DIR = str(config_dir())  # config_path of every app's @hydra.main

