"""The package as users install it: the wheel's metadata, configs and console scripts, and the Hydra apps
composing their configs from any working directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"tmd-train": "lightning_tmd.train:main", "tmd-pipeline": "lightning_tmd.pipeline:main",
           "tmd-sample": "lightning_tmd.sample:main", "tmd-evaluate": "lightning_tmd.evaluate:main",
           "tmd-export": "lightning_tmd.export:main", "tmd-preprocess": "lightning_tmd.data.preprocess:main"}


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the build writes build/ and *.egg-info beside them), offline."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("lightning_tmd", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(out), str(source)], check=True, timeout=120)
    (path,) = out.glob("lightning_tmd-*.whl")
    return path


def test_wheel_declares_the_dependencies_and_carries_every_config_module_and_script(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(info).decode())
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    runtime = {requirement_name(r) for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    dev = {requirement_name(r) for r in metadata.get_all("Requires-Dist") if 'extra == "dev"' in r}
    assert {"torch", "torchvision", "lightning", "hydra-core", "omegaconf", "diffusers", "transformers",
            "tensorboard"} <= runtime
    assert {"pytest", "ruff"} <= dev and not runtime & dev
    pinned = {requirement_name(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert runtime | dev == pinned  # requirements.txt pins exactly what the package declares

    configs = {f"lightning_tmd/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs == {n for n in names if n.endswith(".yaml")}
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_tmd").rglob("*.py")}
    assert modules <= names, f"not in the wheel (add the package to pyproject.toml): {sorted(modules - names)}"
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


def composed_job(command: list[str], cwd: Path, pythonpath: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    result = subprocess.run([*command, "stage=teacher", "experiment=shapes_smoke", "--cfg", "job"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_installed_wheel_composes_its_configs_from_any_directory(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                    str(site), str(wheel)], check=True, timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([sys.executable, "-c", "from lightning_tmd.app import CONFIG_DIR; print(CONFIG_DIR)"],
                           cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert Path(where) == site / "lightning_tmd" / "conf"
    job = composed_job([str(site / "bin" / "tmd-train")], elsewhere, site)
    assert "run_name: shapes_smoke" in job and "max_steps: 20" in job and "name: wan_smoke" in job
    assert list(elsewhere.iterdir()) == []  # --cfg job runs nothing


def test_the_checkout_composes_its_configs_from_another_directory(tmp_path):
    job = composed_job([sys.executable, "-m", "lightning_tmd.train"], tmp_path, ROOT)
    assert "run_name: shapes_smoke" in job and "max_steps: 20" in job
