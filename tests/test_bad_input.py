"""Bad input is answered by an error that names the field and the fix, before any long work; sampler settings of
zero are errors, never silent defaults."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from test_apps import compose_app
from test_latents import tiny_vae, unusable_videos

from lightning_tmd.data.preprocess import preprocess
from lightning_tmd.evaluate import evaluate
from lightning_tmd.export import export
from lightning_tmd.generators import load_generator
from lightning_tmd.sample import sample
from lightning_tmd.schedules import shift_setting, steps_setting
from lightning_tmd.train import train


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_steps_must_be_positive_integers(value):
    with pytest.raises(ValueError, match="outer_steps must be a positive integer"):
        steps_setting(value, 2, "outer_steps")


def test_none_means_the_default_and_positive_values_are_kept():
    assert steps_setting(None, 2, "steps") == 2 and steps_setting(3, 2, "steps") == 3
    assert shift_setting(None, 3.0, "shift") == 3.0 and shift_setting(1, 3.0, "shift") == 1.0
    for value in (0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="shift must be a positive number"):
            shift_setting(value, 3.0, "shift")


@pytest.mark.parametrize("setting", ["+sampler.steps=0", "+sampler.shift=0"])
def test_the_sample_app_refuses_zero_teacher_settings(setting, smoke_checkpoint, tmp_path):
    cfg = compose_app("sample", [f"ckpt={smoke_checkpoint}", f"out_dir={tmp_path}", "seeds=[0]",
                                 "prompts=[a red circle moving up]", setting])
    with pytest.raises(ValueError, match=setting.split(".")[1].split("=")[0]):
        sample(cfg)
    assert not (tmp_path / "samples.pt").exists()


@pytest.mark.parametrize("setting", [{"outer_steps": 0}, {"inner_steps": 0}, {"outer_steps": -1}])
def test_a_student_refuses_zero_steps(setting, smoke_student_checkpoint):
    loaded = load_generator(str(smoke_student_checkpoint))
    context = loaded.prompts(["a red circle moving up"]).states
    negative = loaded.prompts.negative(1).states
    with pytest.raises(ValueError, match=next(iter(setting))):
        loaded.module.sample(context, negative, noise=torch.randn(1, *loaded.clip_shape), **setting)
    with pytest.raises(ValueError, match=next(iter(setting))):
        loaded.module.effective_nfe(**setting)


# -- the catalogue: every bad input answered by an error that names the field, before any long work -------------
# docs/bad-input.md is rendered from CASES; regenerate it with
#   WRITE_DOCS=1 python -m pytest tests/test_bad_input.py -k catalogue
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
TRAIN = ["callbacks.samples.every_n_steps=0"]


def bad_files(folder: Path, teacher: Path) -> dict[str, Path]:
    """Files that are not what a checkpoint field expects."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"text": folder / "notes.ckpt", "empty": folder / "empty.ckpt", "random": folder / "random.ckpt",
             "truncated": folder / "truncated.ckpt", "no_state": folder / "tensor.ckpt"}
    files["text"].write_text("not a checkpoint\n")
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
    files["truncated"].write_bytes(teacher.read_bytes()[:2000])
    torch.save({"weights": torch.ones(2)}, files["no_state"])
    return files


def used_folders(folder: Path) -> dict[str, Path]:
    """Folders an earlier run wrote: a training run and a sample run."""
    files = {"used_run": ["checkpoints/last.ckpt", "tensorboard/events.out.tfevents.1", ".hydra/config.yaml",
                          "train.log"],
             "used_samples": ["000_a_red_circle_moving_up.gif", "grid.png", "samples.pt"]}
    for name, paths in files.items():
        for path in paths:
            (folder / name / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / name / path).write_text(path)
    return {name: folder / name for name in files}


# (what a user gives, app, overrides; {teacher}, {student}, {tmp}, {<bad file>} and {<used folder>} are filled in;
# the message regex)
CASES = [
    ("unknown experiment", "train", ["experiment=nope"], r"experiment/nope"),
    ("misspelled key", "train", ["experiment=shapes_smoke", "trainer.max_step=5"], r"max_step"),
    ("max_steps not a number", "train", ["experiment=shapes_smoke", "trainer.max_steps=abc"],
     r"trainer.max_steps='abc' must be a positive integer"),
    ("zero steps", "train", ["experiment=shapes_smoke", "trainer.max_steps=0"], r"trainer.max_steps=0 must be"),
    ("zero batch size", "train", ["experiment=shapes_smoke", "data.batch_size=0"], r"data.batch_size=0 must be"),
    ("negative learning rate", "train", ["experiment=shapes_smoke", "stage.module.optim.lr=-1"],
     r"stage.module.optim.lr=-1 must be a positive number"),
    ("seed not an integer", "train", ["experiment=shapes_smoke", "seed=abc"], r"seed='abc' must be an integer"),
    ("clip size not divisible by the patch", "train", ["experiment=shapes_smoke", "data.size=15"],
     r"data.size=15 is not divisible"),
    ("no negative prompt", "train", ["experiment=shapes_smoke", "text.negative_prompt=null"],
     r"text.negative_prompt is missing"),
    ("unknown optimizer", "train", ["experiment=shapes_smoke", "stage.module.optim.name=sgd"],
     r"optim.name='sgd' is unknown"),
    ("misspelled optimizer setting", "train", ["experiment=shapes_smoke", "+stage.module.optim.learning_rate=1e-3"],
     r"optim.learning_rate is not an optimizer setting"),
    ("high-noise share outside [0, 1]", "train", ["experiment=shapes_smoke", "stage.module.high_noise_fraction=2"],
     r"stage.module.high_noise_fraction=2"),
    ("resume from a missing checkpoint", "train", ["experiment=shapes_smoke", "ckpt_path={tmp}/none.ckpt"],
     r"ckpt_path: no checkpoint"),
    ("stage 1 without a teacher file", "train", ["experiment=shapes_smoke_tm",
                                                "stage.module.teacher_ckpt={tmp}/none.ckpt"],
     r"stage.module.teacher_ckpt: no checkpoint file"),
    ("teacher checkpoint is a text file", "train", ["experiment=shapes_smoke_tm", "stage.module.teacher_ckpt={text}"],
     r"stage.module.teacher_ckpt: .* is not a readable checkpoint"),
    ("teacher checkpoint is empty", "train", ["experiment=shapes_smoke_tm", "stage.module.teacher_ckpt={empty}"],
     r"stage.module.teacher_ckpt: .* is not a readable checkpoint"),
    ("teacher checkpoint is random bytes", "train",
     ["experiment=shapes_smoke_tm", "stage.module.teacher_ckpt={random}"],
     r"stage.module.teacher_ckpt: .* is not a readable checkpoint"),
    ("teacher checkpoint is truncated", "train",
     ["experiment=shapes_smoke_tm", "stage.module.teacher_ckpt={truncated}"],
     r"stage.module.teacher_ckpt: .* is not a readable checkpoint"),
    ("teacher checkpoint is a torch file without weights", "train",
     ["experiment=shapes_smoke_tm", "stage.module.teacher_ckpt={no_state}"], r"not a Lightning checkpoint"),
    ("flow head as deep as the teacher", "train", ["experiment=shapes_smoke_tm", "stage.module.teacher_ckpt={teacher}",
                                                  "stage.module.head_blocks=2"], r"stage.module.head_blocks=2"),
    ("a teacher given as the stage-2 student", "train",
     ["experiment=shapes_smoke_dmd", "stage.module.teacher_ckpt={teacher}", "stage.module.student_ckpt={teacher}"],
     r"holds a teacher \(stage=teacher\), not a student"),
    ("stage-2 student of another (M, N)", "train",
     ["experiment=shapes_smoke_dmd", "stage.module.teacher_ckpt={teacher}", "stage.module.student_ckpt={student}",
      "stage.module.student.outer_steps=1"], r"stage.module.student.outer_steps=1 but"),
    ("discriminator block outside the teacher", "train",
     ["experiment=shapes_smoke_dmd", "stage.module.teacher_ckpt={teacher}", "stage.module.student_ckpt={student}",
      "stage.module.critic.discriminator.blocks=[1,9]"], r"discriminator.blocks \[9\]"),
    ("empty nets without a weights folder", "train", ["experiment=shapes_smoke", "model.meta_init=true"],
     r"model.meta_init=true builds the nets empty .* set model.path"),
    ("empty nets with a teacher checkpoint", "train",
     ["experiment=shapes_smoke_tm", "stage.module.teacher_ckpt={teacher}", "model.meta_init=true",
      "model.path={tmp}"], r"stage.module.teacher_ckpt=.* with model.meta_init=true"),
    ("sample: missing checkpoint", "sample", ["ckpt={tmp}/none.ckpt"], r"ckpt: no checkpoint"),
    ("sample: checkpoint is random bytes", "sample", ["ckpt={random}"], r"ckpt: .* is not a readable checkpoint"),
    ("sample: zero fps", "sample", ["ckpt={teacher}", "fps=0"], r"fps=0 must be a positive integer"),
    ("sample: zero batch size", "sample", ["ckpt={teacher}", "batch_size=0"], r"batch_size=0 must be"),
    ("sample: no prompts", "sample", ["ckpt={teacher}", "prompts=[]"], r"prompts: give at least one prompt"),
    ("sample: zero teacher steps", "sample", ["ckpt={teacher}", "+sampler.steps=0"],
     r"steps must be a positive integer"),
    ("sample: zero inner steps", "sample", ["ckpt={student}", "+sampler.inner_steps=0"],
     r"inner_steps must be a positive integer"),
    ("evaluate: one clip per set", "evaluate", ["models.teacher.ckpt={teacher}", "num_samples=1"],
     r"num_samples=1: FVD-shapes needs at least 2"),
]
CASES += [("train on a GPU without one", "train", ["experiment=shapes_smoke", "trainer.accelerator=gpu"],
           r"trainer.accelerator=gpu but no CUDA GPU"),
          ("sample on a GPU without one", "sample", ["ckpt={teacher}", "device=cuda"], r"device=cuda but no CUDA GPU")]
CASES += [("a new run into a used run folder", "train", ["experiment=shapes_smoke", "output_dir={used_run}"],
           r"output_dir: the run folder .* already holds an earlier run .* ckpt_path=.* overwrite=true"),
          ("sample into a folder of earlier samples", "sample", ["ckpt={teacher}", "out_dir={used_samples}"],
           r"out_dir: .* already holds the outputs of an earlier run .* overwrite=true"),
          ("export over a training run", "export", ["ckpt={student}", "out={used_run}", "overwrite=true"],
           r"out: .* no model_index.json: it looks like a training run, .* choose another out")]
CASES += [("preprocess: no captions file", "preprocess", ["captions={tmp}/none.csv"], r"captions: no file at"),
          ("preprocess: listed videos missing from the folder", "preprocess", ["videos={tmp}/files"],
           r"videos: 3 video\(s\) listed in the captions file are missing from"),
          ("preprocess: every video empty, not a video or truncated", "preprocess", ["videos={tmp}/preprocess/videos"],
           r"videos: none of the 3 videos listed for .* could be used")]


def preprocess_inputs(folder: Path) -> list[str]:
    """Preprocess overrides: a folder of three unusable videos and its captions, a tiny Wan VAE, vocabulary text."""
    videos, captions = unusable_videos(folder)
    tiny_vae().save_pretrained(folder / "wan" / "vae")
    return [f"videos={videos}", f"captions={captions}", f"out={folder / 'out'}", f"model_path={folder / 'wan'}",
            "text=vocab", "frames=5", "height=16", "width=16", "device=cpu"]


def run_case(case, tmp_path: Path, teacher: Path, student: Path) -> str:
    """Run one bad input; return the error message it gets (tmp paths written as <tmp>)."""
    _, app, overrides, _ = case
    files = bad_files(tmp_path / "files", teacher)
    fill = {"tmp": tmp_path, "teacher": teacher, "student": student, **files, **used_folders(tmp_path / "used")}
    overrides = [o.format(**fill) for o in overrides]
    with pytest.raises(Exception) as caught:
        if app == "train":
            train(compose_train([*TRAIN, *overrides], tmp_path / "run"))
        elif app == "sample":
            sample(compose_app("sample", [f"out_dir={tmp_path / 'out'}", "seeds=[0]",
                                          "prompts=[a red circle moving up]", *overrides]))
        elif app == "export":
            export(compose_app("export", overrides))
        elif app == "preprocess":
            preprocess(compose_app("preprocess", [*preprocess_inputs(tmp_path / "preprocess"), *overrides]))
        else:
            evaluate(compose_app("evaluate", [f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
                                              *overrides]))
    message = str(caught.value).replace(str(tmp_path), "<tmp>").replace(str(teacher), "<teacher.ckpt>")
    return message.replace(str(student), "<student.ckpt>").strip().splitlines()[0]


PIPE = "\\|"  # a | inside a markdown table cell


def render_catalogue(messages: list[str]) -> str:
    lines = ["# Bad input and what it answers", "",
             "Each row is a test case of `tests/test_bad_input.py` (the app, the overrides, the first line of the "
             "error); every error is raised before any long work starts (preprocess opens each listed video to "
             "find the unusable ones: a video that cannot be used is skipped and listed, only a folder without one "
             "usable video is an error). Rebuild: "
             "`WRITE_DOCS=1 python -m pytest tests/test_bad_input.py -k catalogue`.", "",
             "| input | app | overrides | error |", "|---|---|---|---|"]
    for (name, app, overrides, _), message in zip(CASES, messages):
        shown = " ".join(overrides).replace("{", "<").replace("}", ">").replace("|", PIPE)
        lines.append(f"| {name} | {app} | `{shown}` | {message.replace('|', PIPE)} |")
    return "\n".join(lines) + "\n"


def test_every_bad_input_is_named_and_the_catalogue_doc_is_current(tmp_path, smoke_checkpoint,
                                                                    smoke_student_checkpoint):
    cases = [c for c in CASES if not ("without one" in c[0] and torch.cuda.is_available())]
    messages = [run_case(case, tmp_path / str(i), smoke_checkpoint, smoke_student_checkpoint)
                for i, case in enumerate(cases)]
    wrong = [f"{case[0]}: {message}" for case, message in zip(cases, messages) if not re.search(case[3], message)]
    assert not wrong, "\n".join(wrong)
    if torch.cuda.is_available():
        return  # the catalogue is made on a machine without a GPU (its last rows need one to be absent)
    text = render_catalogue(messages)
    if os.environ.get("WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/bad-input.md is stale: rebuild it with WRITE_DOCS=1 (see its header)"
