"""What the Hydra apps (train, pipeline, sample, evaluate, export, preprocess) share: where their configs are,
where their log messages go, and the run folder a failed start leaves."""

from __future__ import annotations

import contextlib
import logging
import shutil
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


def log_lightning_into_run_log() -> None:
    """Let Lightning's messages go where the app's own do: Hydra's console and `<run dir>/<app>.log`.

    Imported before Hydra configures logging, Lightning gives its loggers a console handler of their own and
    stops them from reaching the root logger that writes the log file."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def remove_unused_run_folder(folder: Path) -> bool:
    """Remove a run folder that holds nothing but Hydra's `.hydra/` and log files (an app that failed before it
    wrote anything), then its parents that this leaves empty, up to the working directory. Returns whether it did."""
    folder, cwd = Path(folder).absolute(), Path.cwd().absolute()
    if folder == cwd or folder in cwd.parents or not folder.is_dir():
        return False
    if any(p.name != ".hydra" and p.suffix != ".log" for p in folder.iterdir()):
        return False
    for handler in list(logging.getLogger().handlers):  # the log file is open (and could not be removed on Windows)
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    with contextlib.suppress(OSError):  # another process wrote there meanwhile
        while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    return True
