"""What the Hydra apps (train, pipeline, sample, evaluate, export, preprocess) share: where their configs are,
where their log messages go, a new run folder per run, and what an earlier run left in a folder."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf


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


_FRESH: dict[str, str] = {}  # the folder fresh_folder gave for each path, once per process


def create_fresh_folder(base: Path) -> Path:
    """Create `base`, else the first of `base_1`, `base_2`, ... that does not exist yet (its parents first).
    Each `mkdir` is exclusive, so two processes never get the same folder."""
    if not base.name or base.name in (".", ".."):
        raise ValueError(f"tmd_fresh: '{base}' names no folder: give a path such as runs/<name>/<time>")
    base.parent.mkdir(parents=True, exist_ok=True)
    folder, n = base, 0
    while True:
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}_{n}")


def fresh_folder(path: str) -> str:
    """The resolver `${tmd_fresh:<path>}` of the default run folders: a folder this process created, `path` or
    `path_<n>`. The same answer for the same `path` all process long (Hydra may resolve a run dir more than once)."""
    if path not in _FRESH:
        folder = create_fresh_folder(Path(path))
        _FRESH[path] = str(folder)
    return _FRESH[path]


def checkpoint_run_folder(ckpt_path: str | None) -> Path | None:
    """The run folder `<run>` of a checkpoint `<run>/checkpoints/<name>` (a file, or the folder of a sharded one)
    that exists; None for no checkpoint or one elsewhere."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints" or not path.exists():
        return None
    return path.parent.parent


def run_folder(ckpt_path: str | None, fresh: str) -> str:
    """The resolver `${tmd_run_dir:<ckpt_path>,<path>}` of the train app's default run folder: a resumed run goes
    on in the run folder its checkpoint lies in (its TensorBoard curve continues); any other run gets
    `${tmd_fresh:<path>}`."""
    run = checkpoint_run_folder(ckpt_path)
    return str(run) if run is not None else fresh_folder(fresh)


def register_resolvers() -> None:
    """Register `tmd_fresh` and `tmd_run_dir` (once; importing this module does it, before any app's Hydra
    resolves its run dir)."""
    for name, resolver in (("tmd_fresh", fresh_folder), ("tmd_run_dir", run_folder)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()


def earlier_run_files(folder: Path) -> list[Path]:
    """What a run folder holds besides Hydra's `.hydra/` and log files (an earlier run's outputs), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name != ".hydra" and p.suffix != ".log")


def describe(paths: list[Path], folder: Path, limit: int = 4) -> str:
    """A few of `paths` relative to `folder` for an error message: `checkpoints/last.ckpt`, `tensorboard/`, ..."""
    def name(path: Path) -> str:
        if (path / "last.ckpt").exists():  # a file, or the folder of a sharded checkpoint
            path = path / "last.ckpt"
        return path.relative_to(folder).as_posix() + ("/" if path.is_dir() else "")

    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(name(p) for p in paths[:limit]) + more


def remove_paths(paths: Iterable[Path]) -> None:
    """Delete files and folders (an earlier run's outputs that overwrite=true replaces)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def resume_checkpoint(folder: Path) -> Path | None:
    """The checkpoint to resume the run in `folder` from: its last.ckpt, else its newest periodic one."""
    checkpoints = folder / "checkpoints"
    candidates = [checkpoints / "last.ckpt", *sorted(checkpoints.glob("step_*.ckpt"), reverse=True)]
    return next((path for path in candidates if path.exists()), None)


def used_run_folder_error(folder: Path, earlier: list[Path]) -> FileExistsError:
    """The refusal of a new training run in `folder`, which holds the outputs `earlier` of an earlier run."""
    resume = resume_checkpoint(folder)
    return FileExistsError(
        f"output_dir: the run folder '{folder}' already holds an earlier run ({describe(earlier, folder)}): "
        + (f"resume it with ckpt_path={resume}, " if resume else "")
        + "choose another folder (hydra.run.dir=<new folder>), or pass overwrite=true to start afresh there "
        "(this deletes the earlier run's files in it, except Hydra's .hydra/ and the logs)")


class RefuseUsedRunFolder(HydraCallback):
    """Hydra callback of the train app: a new run into a folder an earlier run left outputs in is refused before
    Hydra writes its `.hydra/` there, so the earlier run's record stays as it was. (`train.check_run_folder`
    makes the same check for runs started without Hydra's app, and does what overwrite=true asks.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("ckpt_path") or config.get("overwrite") or rank_zero_only.rank != 0:
            return
        folder = Path(config.hydra.run.dir).absolute()
        earlier = earlier_run_files(folder)
        if earlier:  # Hydra turns a callback's exceptions into warnings: SystemExit stops the run (exit code 1)
            raise SystemExit(f"{type(error := used_run_folder_error(folder, earlier)).__name__}: {error}")


def check_earlier_outputs(folder: Path, earlier: list[Path], overwrite: bool, default: str) -> None:
    """Refuse to write into `folder` beside the outputs `earlier` of an earlier run, unless overwrite=true.
    `default` is the app's folder of new runs (samples, evaluations)."""
    if earlier and not overwrite:
        raise FileExistsError(
            f"out_dir: '{folder}' already holds the outputs of an earlier run ({describe(earlier, folder)}): choose "
            f"another folder (out_dir= or hydra.run.dir=; leave both unset for a new folder under {default}/), or "
            "pass overwrite=true to replace them")


def holds_working_directory(folder: Path) -> bool:
    """Whether `folder` (absolute) is the working directory or one of its parents: never a run folder to delete."""
    cwd = Path.cwd().absolute()
    return folder == cwd or folder in cwd.parents


def remove_unused_run_folder(folder: Path) -> bool:
    """Remove a run folder that holds nothing but Hydra's `.hydra/` and log files (an app that failed before it
    wrote anything), then its parents that this leaves empty, up to the working directory. Returns whether it did."""
    folder, cwd = Path(folder).absolute(), Path.cwd().absolute()
    if holds_working_directory(folder) or not folder.is_dir():
        return False
    if earlier_run_files(folder):
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
