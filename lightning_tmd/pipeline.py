"""The main job in one command: teacher -> TMD stage 1 -> TMD stage 2 -> evaluation, optionally with the
DMD2-v baselines, every stage in its own process and its own sub-folder of one run folder.

    python -m lightning_tmd.pipeline                          # pipeline=shapes -> runs/pipeline/shapes/
    python -m lightning_tmd.pipeline pipeline=shapes_quick    # a tiny model: checks that everything connects
    python -m lightning_tmd.pipeline pipeline.baselines=[dmd2v] pipeline.teacher_ckpt=<a teacher's last.ckpt>

Each stage reads the earlier stages' final checkpoints from the run folder. Running the same command again
skips the finished stages (final checkpoint present and loadable) and resumes an interrupted one from its
newest loadable checkpoint. At the end: `results.md` / `results.json` (the evaluation table and the paths),
`samples.gif` (every model on the same prompts and seeds), and every stage's TensorBoard logs under the run
folder (`tensorboard --logdir runs/pipeline/<name>`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from lightning_tmd.app import CONFIG_DIR, earlier_run_files
from lightning_tmd.checkpoints import loadable, newest_loadable_periodic

KINDS = ("teacher", "stage1", "stage2", "kd", "dmd2v", "dmd2v_1step")
BASELINES = ("dmd2v",)
CONFIG_FILE = "pipeline.yaml"


@dataclass
class Stage:
    """One training stage of the pipeline: a `lightning_tmd.train` run in `<run folder>/<name>`."""

    name: str  # its folder, e.g. stage2_m2n2
    kind: str  # one of KINDS: picks the experiment and the per-kind overrides
    label: str  # the model's name in the results
    links: dict[str, str] = field(default_factory=dict)  # train override key -> the stage whose final checkpoint
    overrides: list[str] = field(default_factory=list)  # its own overrides (grid of a TMD student, ...)
    sampler: dict[str, Any] = field(default_factory=dict)  # how the evaluation samples it


def plan(cfg: DictConfig) -> list[Stage]:
    """The training stages in order: the teacher (unless given), per TMD (M, N) stage 1 then stage 2, then the
    baselines (KD warm-up, one-step DMD2-v from it, DMD2-v with M = 2 from the teacher)."""
    p = cfg.pipeline
    unknown = sorted(set(p.baselines or []) - set(BASELINES))
    if unknown:
        raise ValueError(f"pipeline.baselines: {unknown} unknown; choose from {list(BASELINES)}")
    stages = [] if p.teacher_ckpt else [Stage("teacher", "teacher", "teacher")]
    teacher = {"stage.module.teacher_ckpt": "teacher"}
    for m, n in (tuple(s) for s in p.students):
        if m < 1 or n < 1:
            raise ValueError(f"pipeline.students: (M, N) = ({m}, {n}); both must be >= 1")
        grid = f"m{m}n{n}"
        stages.append(Stage(f"stage1_{grid}", "stage1", f"TMD stage 1 M{m} N{n}", dict(teacher),
                            [f"stage.module.outer_steps={m}", f"stage.module.inner_steps={n}"],
                            {"outer_steps": m, "inner_steps": n}))
        stages.append(Stage(f"stage2_{grid}", "stage2", f"TMD M{m} N{n}",
                            {**teacher, "stage.module.student_ckpt": f"stage1_{grid}"},
                            [f"stage.module.student.outer_steps={m}", f"stage.module.student.inner_steps={n}"],
                            {"outer_steps": m, "inner_steps": n}))
    if "dmd2v" in (p.baselines or []):
        stages += [Stage("kd", "kd", "KD warm-up M1", dict(teacher), [], {"outer_steps": 1}),
                   Stage("dmd2v_m1", "dmd2v_1step", "DMD2-v M1 (KD)", {**teacher, "stage.module.student_ckpt": "kd"},
                         [], {"outer_steps": 1}),
                   Stage("dmd2v_m2", "dmd2v", "DMD2-v M2", dict(teacher), [], {"outer_steps": 2})]
    names = [s.name for s in stages] + ["evaluation"]
    if p.until is not None and p.until not in names:
        raise ValueError(f"pipeline.until={p.until}: no such stage; this pipeline's stages are {names}")
    if p.until is not None:
        stages = stages[: names.index(p.until) + 1]
    return stages


def compose_train(overrides: list[str]) -> DictConfig:
    """train.yaml with `overrides` (inside a Hydra app or not)."""
    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=overrides)
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


class Pipeline:
    """Runs the planned stages in `folder`, each in a subprocess, skipping finished ones."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg, self.p = cfg, cfg.pipeline
        self.folder = Path(cfg.root) / self.p.name
        self.stages = plan(cfg)
        self.evaluate = self.p.until is None or self.p.until == "evaluation"
        self.log_lines: list[str] = []
        self.started = time.perf_counter()
        self.record: dict[str, dict[str, Any]] = {}

    # -- paths ----------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        return self.folder / name

    def checkpoint(self, name: str) -> Path:
        """The final checkpoint a stage leaves (the teacher's may be given by pipeline.teacher_ckpt)."""
        if name == "teacher" and self.p.teacher_ckpt:
            return Path(self.p.teacher_ckpt)
        return self.stage_dir(name) / "checkpoints" / "last.ckpt"

    def train_overrides(self, stage: Stage) -> list[str]:
        kind_overrides = list((self.p.overrides or {}).get(stage.kind, []))
        links = [f"{key}={self.checkpoint(source)}" for key, source in stage.links.items()]
        return [f"experiment={self.p.experiments[stage.kind]}", f"seed={self.p.seed}", *links, *stage.overrides,
                *self.p.common_overrides, *kind_overrides, f"hydra.run.dir={self.stage_dir(stage.name)}"]

    # -- checks before any work -------------------------------------------------------------------
    def check(self) -> dict[str, int]:
        """Bad input fails here: the teacher checkpoint, a run folder of another pipeline, every stage's config
        (composed, so unknown experiments and misspelled keys are named). Returns each stage's max_steps."""
        if self.p.teacher_ckpt:
            check_teacher_checkpoint(self.p.teacher_ckpt)
        saved = self.folder / CONFIG_FILE
        mine = OmegaConf.to_container(self.p, resolve=True)
        if saved.is_file() and not self.cfg.force:
            theirs = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
            if drop_until(theirs) != drop_until(mine):
                changed = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
                raise ValueError(f"{self.folder} holds another pipeline (its {CONFIG_FILE} differs in {changed}): "
                                 "give this one another pipeline.name, or force=true to run it there anyway")
        steps = {}
        for stage in self.stages:
            overrides = self.train_overrides(stage)
            try:
                cfg = compose_train([o for o in overrides if not o.startswith("hydra.")])
            except Exception as error:  # Hydra's own errors name the override
                raise ValueError(f"pipeline stage {stage.name}: its config does not compose ({error})") from error
            steps[stage.name] = int(cfg.trainer.max_steps)
        self.folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.p, saved, resolve=True)
        return steps

    # -- running --------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[pipeline {self.p.name} {format_minutes(time.perf_counter() - self.started)}] {text}"
        print(line, flush=True)
        self.log_lines.append(line)
        with (self.folder / "pipeline.log").open("a") as f:
            f.write(line + "\n")

    def remaining_minutes(self, index: int) -> float:
        names = [s.kind for s in self.stages[index:]] + (["evaluation"] if self.evaluate else [])
        return sum(float(self.p.minutes.get(kind, 0)) for kind in names)

    def run(self) -> dict[str, Any]:
        max_steps = self.check()
        total = len(self.stages) + int(self.evaluate)
        for i, stage in enumerate(self.stages):
            head = f"stage {i + 1} of {total}, {stage.name}"
            state = finished_or_resume(self.stage_dir(stage.name), max_steps[stage.name])
            if state == "finished":
                self.say(f"{head}: finished earlier, skipped")
                self.record[stage.name] = {"status": "skipped (finished earlier)"}
                continue
            resume = start_overrides(self.stage_dir(stage.name), state)
            self.say(f"{head}: {'resuming from ' + str(state) if state else 'starting'} "
                     f"(expected remaining ~{self.remaining_minutes(i):.0f} min on 2 CPU cores)")
            started = time.perf_counter()
            code = run_stage_process([sys.executable, "-m", "lightning_tmd.train", *self.train_overrides(stage),
                                      *resume])
            if code != 0:
                self.say(f"{head}: {stop_reason(code)}; run the same command again to resume")
                raise SystemExit(code)
            minutes = (time.perf_counter() - started) / 60
            self.record[stage.name] = {"status": "trained", "minutes": round(minutes, 1),
                                       "resumed_from": str(state) if state else None}
            self.say(f"{head}: done in {minutes:.1f} min -> {self.checkpoint(stage.name)}")
        if not self.evaluate:
            return {"name": self.p.name, "folder": str(self.folder), "stages": self.record}
        return self.run_evaluation(total)

    def run_evaluation(self, total: int) -> dict[str, Any]:
        folder = self.stage_dir("evaluation")
        self.say(f"stage {total} of {total}, evaluation: starting (expected ~{self.p.minutes.evaluation} min)")
        started = time.perf_counter()
        suite_dir = folder / "suite"
        suite_dir.mkdir(parents=True, exist_ok=True)
        models = self.evaluation_models()
        (suite_dir / "pipeline.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml({"models": models}))
        code = run_stage_process([sys.executable, "-m", "lightning_tmd.evaluate", "--config-dir", str(folder),
                                  "suite=pipeline", f"out_dir={folder}", f"hydra.run.dir={folder}", "overwrite=true",
                                  *self.p.evaluation.overrides])  # overwrite: a re-run replaces the earlier table
        if code != 0:
            self.say(f"stage {total} of {total}, evaluation: {stop_reason(code)}; run the same command again")
            raise SystemExit(code)
        gif = self.folder / "samples.gif"
        self.write_side_by_side(models, gif)
        self.record["evaluation"] = {"status": "evaluated", "minutes": round((time.perf_counter() - started) / 60, 1)}
        return self.write_results(folder, gif)

    def evaluation_models(self) -> dict[str, Any]:
        """The evaluation suite: the teacher at its own sampler and at few Euler steps, every student at its grid."""
        models = {"teacher": {"ckpt": str(self.checkpoint("teacher")),
                              "settings": OmegaConf.to_container(self.p.evaluation.teacher_settings)}}
        for stage in self.stages:
            if stage.kind != "teacher":
                grid = ", ".join(f"{k} {v}" for k, v in stage.sampler.items())
                models[stage.name] = {"ckpt": str(self.checkpoint(stage.name)), "settings": {grid: stage.sampler}}
        return models

    def write_side_by_side(self, models: dict[str, Any], path: Path) -> None:
        from lightning_tmd.generators import load_generator
        from lightning_tmd.sampling import sample_clips
        from lightning_tmd.video import labelled_rows, save_video, to_uint8

        prompts = list(self.p.evaluation.gif_prompts)
        labels = {s.name: s.label for s in self.stages}
        rows = []
        for name, model in models.items():
            loaded = load_generator(model["ckpt"])
            setting, sampler = next(iter(model["settings"].items()))
            seeds = [self.p.evaluation.gif_seed] * len(prompts)
            clips, nfe = sample_clips(loaded.module, loaded.prompts, prompts, seeds, loaded.clip_shape, **sampler)
            label = f"{labels.get(name, name)}\n{setting}" if name == "teacher" else labels.get(name, name)
            rows.append((f"{label}\nNFE {nfe:.3g}", to_uint8(clips)))
        save_video(labelled_rows(rows), path, fps=4)

    def write_results(self, folder: Path, gif: Path) -> dict[str, Any]:
        metrics = json.loads((folder / "metrics.json").read_text())
        table = (folder / "table.md").read_text()
        paths = {name: str(self.checkpoint(name)) for name in ["teacher", *(s.name for s in self.stages)]}
        result = {"name": self.p.name, "folder": str(self.folder), "stages": self.record, "checkpoints": paths,
                  "evaluation": metrics, "samples_gif": str(gif),
                  "wall_minutes": round((time.perf_counter() - self.started) / 60, 1)}
        (self.folder / "results.json").write_text(json.dumps(result, indent=2))
        lines = [f"# Pipeline {self.p.name}", "", f"Command: `{command_line()}`", "", table, "## Stages", "",
                 "| stage | what happened | minutes | checkpoint |", "|---|---|---|---|"]
        for name, path in paths.items():
            entry = self.record.get(name, {"status": "given (pipeline.teacher_ckpt)"})
            lines.append(f"| {name} | {entry['status']} | {entry.get('minutes', '–')} | `{path}` |")
        lines += ["", f"Samples of every model on the same prompts and seeds: `{gif}`.",
                  f"TensorBoard: `tensorboard --logdir {self.folder}`.", ""]
        (self.folder / "results.md").write_text("\n".join(lines))
        self.say(f"results: {self.folder / 'results.md'}\n{table}")
        return result


def run_stage_process(command: list[str]) -> int:
    """Run a stage in its own process and return its exit code. A SIGTERM sent to the pipeline is passed on to it
    (it finishes its iteration, saves and stops); a Ctrl+C in the terminal reaches it directly (same process group),
    so the pipeline only waits for it then."""
    process = subprocess.Popen(command)

    def forward(signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM:
            process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code  # killed by signal k: the shell's 128 + k


def stop_reason(code: int) -> str:
    """What a stage's exit code says: stopped by SIGTERM / SIGINT after saving (128 + signal), killed, or failed."""
    signum = code - 128
    if signum in (signal.SIGTERM, signal.SIGINT):
        return f"stopped by {signal.Signals(signum).name} (exit code {code}) after saving its checkpoint"
    if signum in {int(s) for s in signal.Signals}:
        return f"killed by {signal.Signals(signum).name} (exit code {code})"
    return f"failed with exit code {code}; fix the cause"


def command_line() -> str:
    """The command that ran this pipeline (its overrides as given), or its Python call."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return " ".join(["python -m lightning_tmd.pipeline", *HydraConfig.get().overrides.task])
    return "lightning_tmd.pipeline.pipeline(cfg)"


def drop_until(config: dict) -> dict:
    """A pipeline config without the settings that do not change what its stages compute."""
    return {k: v for k, v in config.items() if k not in ("until", "minutes")}


def format_minutes(seconds: float) -> str:
    return f"{int(seconds // 60):d}:{int(seconds % 60):02d}"


def finished_or_resume(folder: Path, max_steps: int) -> str | Path | None:
    """'finished' when the stage's last.ckpt is loadable and at its final step; else the newest loadable
    checkpoint to resume from (last.ckpt, else the latest periodic one), or None to start afresh."""
    checkpoints = folder / "checkpoints"
    last = loadable(checkpoints / "last.ckpt")
    if last is not None and last.get("global_step", 0) >= max_steps:
        return "finished"
    if last is not None:
        return checkpoints / "last.ckpt"
    return newest_loadable_periodic(checkpoints)


def start_overrides(folder: Path, state: Path | None) -> list[str]:
    """How a stage that is not finished starts: resumed from `state`, else afresh, with overwrite=true when an
    earlier attempt left files in its folder but no checkpoint to resume (killed before its first one)."""
    if state is not None:
        return [f"ckpt_path={state}"]
    return ["overwrite=true"] if earlier_run_files(folder) else []


def check_teacher_checkpoint(path: str) -> None:
    """pipeline.teacher_ckpt must be a loadable teacher checkpoint (stage=teacher)."""
    checkpoint = loadable(Path(path))
    if checkpoint is None:
        raise FileNotFoundError(f"pipeline.teacher_ckpt: no loadable checkpoint at '{path}'")
    stage = checkpoint.get("run_config", {}).get("stage", {}).get("name")
    if stage != "teacher":
        raise ValueError(f"pipeline.teacher_ckpt: '{path}' is a {stage or 'non-teacher'} checkpoint, not a teacher's "
                         "(stage=teacher); give a teacher's last.ckpt or leave it null to train one")


def pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured pipeline; returns its results (also written to results.json)."""
    return Pipeline(cfg).run()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="pipeline")
def main(cfg: DictConfig) -> None:
    pipeline(cfg)


if __name__ == "__main__":
    main()
