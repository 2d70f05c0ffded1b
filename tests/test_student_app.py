"""Stage 1 through the Hydra train app: trains from a teacher checkpoint, resumes, fails fast."""

from pathlib import Path

import pytest
import torch
from conftest import compose_train
from omegaconf import OmegaConf
from test_apps import compose_app

from lightning_tmd.checkpoints import sampling_state_dict
from lightning_tmd.checks import check_matching_checkpoint
from lightning_tmd.evaluate import evaluate
from lightning_tmd.generators import load_generator
from lightning_tmd.modules.student import StudentModule
from lightning_tmd.sample import sample
from lightning_tmd.train import train


def stage1_cfg(out: Path, teacher: Path, *overrides: str):
    return compose_train(["experiment=shapes_smoke_tm", f"stage.module.teacher_ckpt={teacher}", *overrides], out)


def test_stage1_trains_from_the_teacher_samples_and_resumes(smoke_checkpoint, smoke_student_checkpoint, tmp_path):
    ckpt = smoke_student_checkpoint
    assert [p.name for p in (ckpt.parent.parent / "tensorboard" / "samples").glob("*.gif")] == ["step_0000005.gif"]
    loaded = load_generator(ckpt)
    assert isinstance(loaded.module, StudentModule)
    clips, nfe = loaded.module.sample(loaded.prompts(["a red circle moving up"]).states,
                                      shape=loaded.clip_shape, outer_steps=1, inner_steps=2)
    assert clips.shape == (1, *loaded.clip_shape) and nfe == 1.5  # 1 * (1 + 1 * 1 / 2)

    resumed = stage1_cfg(tmp_path / "resumed", smoke_checkpoint, "trainer.max_steps=10", f"ckpt_path={ckpt}")
    metrics = train(resumed)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    final = torch.load(Path(resumed.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 10
    assert final["optimizer_states"][0]["state"][0]["step"] == 10


def test_sample_and_evaluate_apps_take_a_student_and_its_m_n(smoke_student_checkpoint, tiny_judge, tmp_path):
    out = tmp_path / "samples"
    saved = sample(compose_app("sample", [f"ckpt={smoke_student_checkpoint}", f"out_dir={out}", "seeds=[0,1]",
                                          "prompts=[a red circle moving up]", "+sampler.outer_steps=2",
                                          "+sampler.inner_steps=2"]))
    assert saved["videos"].shape == (2, 4, 16, 16, 3) and saved["nfe"] == 3.0  # 2 * (1 + 1 * 1 / 2)
    overrides = [f"out_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}", f"judge.path={tiny_judge[0]}",
                 "num_samples=8", "batch_size=8", "latency.repeats=1", "latency.batch_size=2", "references=false",
                 "~models.teacher", f"+models.student={{ckpt: '{smoke_student_checkpoint}', settings: "
                 "{M1 N1: {outer_steps: 1, inner_steps: 1}, M2 N3: {outer_steps: 2, inner_steps: 3}}}"]
    rows = evaluate(compose_app("evaluate", overrides))
    assert [(r["setting"], r["nfe"]) for r in rows] == [("M1 N1", 1.0), ("M2 N3", 4.0)]
    assert all(0 <= r["adherence"] <= 1 and r["fvd"] >= 0 for r in rows)


def test_stage1_distils_an_edm_teacher(tmp_path):
    """A teacher with model.prediction=edm: the student's head reads its output through the same
    preconditioning, trains, and samples."""
    train(compose_train(["experiment=shapes_smoke", "callbacks.samples.every_n_steps=0", "trainer.max_steps=4",
                         "model.prediction=edm", "model.sigma_data=0.5"], tmp_path / "teacher"))
    teacher = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="model.prediction"):  # the student's model must say what the teacher is
        train(stage1_cfg(tmp_path / "mismatch", teacher, "trainer.max_steps=2"))
    metrics = train(stage1_cfg(tmp_path / "student", teacher, "trainer.max_steps=3", "model.prediction=edm",
                               "model.sigma_data=0.5", "callbacks.samples.every_n_steps=0"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    loaded = load_generator(tmp_path / "student" / "checkpoints" / "last.ckpt")
    assert loaded.module.net.wan.prediction == "edm" and loaded.module.net.wan.sigma_data == 0.5
    clips, _ = loaded.module.sample(loaded.prompts(["a red circle moving up"]).states, shape=loaded.clip_shape,
                                    outer_steps=1, inner_steps=2)
    assert torch.isfinite(clips).all()


def test_stage1_starts_from_the_teachers_ema_weights(smoke_checkpoint):
    teacher = sampling_state_dict(str(smoke_checkpoint))
    raw = torch.load(smoke_checkpoint, weights_only=False)["state_dict"]
    key = next(iter(teacher))
    assert torch.equal(teacher[key], raw[f"ema.module.{key}"])
    cfg = torch.load(smoke_checkpoint, weights_only=False)["run_config"]
    module = StudentModule(model=cfg["model"], teacher_ckpt=str(smoke_checkpoint), head_blocks=1)
    module.setup("fit")
    for name, value in teacher.items():
        assert torch.equal(module.net.wan.state_dict()[name], value)


def test_an_unset_text_encoder_option_matches_a_teacher_from_before_the_option(smoke_checkpoint):
    cfg = OmegaConf.create(torch.load(smoke_checkpoint, weights_only=False)["run_config"])
    cfg.text.encoder.hidden_layer = None  # e.g. text.encoder.hidden_layer: null, which that teacher never had
    check_matching_checkpoint(cfg, "stage.module.teacher_ckpt", str(smoke_checkpoint), "")
    cfg.text.encoder.hidden_layer = 1
    with pytest.raises(ValueError, match="text.encoder"):
        check_matching_checkpoint(cfg, "stage.module.teacher_ckpt", str(smoke_checkpoint), "")


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["stage.module.teacher_ckpt=/no/such.ckpt"], FileNotFoundError, "teacher_ckpt"),
        (["stage.module.teacher_ckpt=null"], ValueError, "teacher_ckpt is null"),
        (["stage.module.head_blocks=2"], ValueError, "head_blocks=2"),
        (["model.config.ffn_dim=64"], ValueError, "model.config"),
        (["text.negative_prompt=blurry"], ValueError, "text.negative_prompt"),
        (["data.speed=0.09"], ValueError, "data.speed=0.09 but stage.module.teacher_ckpt"),
        (["data.frames=8"], ValueError, "data.frames=8"),
    ],
)
def test_bad_stage1_config_fails_before_training(smoke_checkpoint, tmp_path, overrides, error, message):
    cfg = stage1_cfg(tmp_path, smoke_checkpoint, *overrides)
    with pytest.raises(error, match=message):
        train(cfg)
