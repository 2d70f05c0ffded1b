"""Stage 2 (DMDModule): update schedule, gradients through the rollout, frozen teacher, checkpoints,
exact resume, the DMD2-v baseline student and KD warm-up, and every stage-2 experiment composed with Hydra."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY_WAN, compose_train
from hydra.utils import instantiate

from lightning_tmd.checkpoints import sampling_state_dict
from lightning_tmd.generators import load_generator
from lightning_tmd.modules.dmd import DMDModule
from lightning_tmd.modules.one_pass import OnePassStudent
from lightning_tmd.modules.teacher import TeacherModule
from lightning_tmd.train import train

SMOKE_TEXT = ["text=vocab", "text.encoder.dim=16", "text.encoder.max_length=16"]
SMOKE_SIZES = ["model=wan_smoke", "data=shapes_smoke", "data.speed=0.06", *SMOKE_TEXT,
               "stage.module.critic.discriminator.blocks=[1,2]", "stage.module.critic.discriminator.widths=[8,16,16]",
               "stage.module.critic.discriminator.mlp_width=8"]


class Recorder(L.Callback):
    """What each iteration did: (iteration, "student" | "critic", its loss)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, str, float]] = []
        self.outputs: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        kind = "student" if "vsd" in outputs else "critic"
        loss = outputs["student_loss" if kind == "student" else "critic_loss"]
        self.steps.append((pl_module.iteration, kind, float(loss)))
        self.outputs.append({k: float(v) for k, v in outputs.items()})


def dmd_cfg(tmp_path: Path, teacher: Path, student: Path | None, *overrides: str):
    student_arg = f"stage.module.student_ckpt={student}" if student else "stage.module.student_ckpt=null"
    return compose_train(["experiment=shapes_smoke_dmd", f"stage.module.teacher_ckpt={teacher}", student_arg,
                          "callbacks.samples.every_n_steps=0", *overrides], tmp_path)


def fit(cfg, recorder: Recorder, ckpt_path: str | None = None) -> DMDModule:
    """What `train()` does, with a recorder among the callbacks."""
    from lightning_tmd.callbacks import ConfigInCheckpoint

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.stage.module, _convert_="all")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [recorder, ConfigInCheckpoint({})]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module


def test_schedule_checkpoint_and_exact_resume(smoke_checkpoint, smoke_student_checkpoint, tmp_path):
    full = Recorder()
    module = fit(dmd_cfg(tmp_path / "full", smoke_checkpoint, smoke_student_checkpoint, "trainer.max_steps=12"), full)
    assert [kind for _, kind, _ in full.steps] == ["student" if k % 5 == 0 else "critic" for k in range(12)]
    assert module.iteration == 12 and module.trainer.global_step == 12  # one optimizer step per iteration
    student_opt, critic_opt = module.trainer.optimizers
    assert int(next(iter(student_opt.state.values()))["step"]) == 3  # iterations 0, 5, 10
    assert int(next(iter(critic_opt.state.values()))["step"]) == 9
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    # the discriminator tells real from fake features even at the smoke sizes (it once gave one logit for all)
    critic_steps = [o for o in full.outputs if "d_real_logit" in o]
    assert all(abs(o["d_real_logit"] - o["d_fake_logit"]) > 1e-6 for o in critic_steps)
    assert all(p.grad is None for p in module.student.net.parameters())  # freed after the student's step

    checkpoint = torch.load(tmp_path / "full" / "checkpoints" / "step_0000005.ckpt", weights_only=False)
    assert checkpoint["dmd_iteration"] == 5
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert any(k.startswith("student.ema.") for k in checkpoint["state_dict"])

    resumed = Recorder()
    again = fit(dmd_cfg(tmp_path / "resumed", smoke_checkpoint, smoke_student_checkpoint, "trainer.max_steps=12"),
                resumed, ckpt_path=str(tmp_path / "full" / "checkpoints" / "step_0000005.ckpt"))
    assert resumed.steps == full.steps[5:]  # the same updates with the same losses, exactly
    for (name, a), b in zip(module.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    for name, value in sampling_state_dict(str(smoke_checkpoint)).items():  # reloaded from its source
        assert torch.equal(again.teacher.net.state_dict()[name], value), name


@pytest.mark.parametrize(("kind", "nfe"), [("tmd", 2 * (1 + 1 / 2)), ("one_pass", 2.0)])
def test_dmd_checkpoint_samples_without_the_teacher(kind, nfe, smoke_checkpoint, smoke_student_checkpoint, tmp_path):
    student = smoke_student_checkpoint if kind == "tmd" else smoke_checkpoint
    other_kind = [] if kind == "tmd" else ["~stage.module.student.head_blocks"]  # the smoke experiment sets H
    train(dmd_cfg(tmp_path, smoke_checkpoint, student, "trainer.max_steps=2", *other_kind,
                  f"stage/student@stage.module.student={kind}", "callbacks.checkpoint.every_n_train_steps=2"))
    loaded = load_generator(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(loaded.module, DMDModule) and loaded.module.teacher is None
    assert loaded.module.hparams.student["kind"] == kind
    context = loaded.prompts(["a red circle moving up"]).states
    clips, got = loaded.module.sample(context, noise=torch.randn(1, *loaded.clip_shape), outer_steps=2,
                                      inner_steps=2)
    assert clips.shape == (1, *loaded.clip_shape) and got == pytest.approx(nfe)


def tiny_dmd(**kwargs) -> DMDModule:
    model = {"path": None, "config": dict(TINY_WAN), "dtype": "float32"}
    module = DMDModule(model, kwargs.pop("student", {"kind": "tmd", "head_blocks": 1, "inner_steps": 2}),
                       critic=kwargs.pop("critic", {"discriminator": {"blocks": [1, 3], "widths": [8, 8, 8],
                                                                       "mlp_width": 8}}), **kwargs)
    module.teacher = TeacherModule(model, ema_decay=None).eval().requires_grad_(False)
    return module


@pytest.mark.parametrize(("rollout", "head_calls"), [(True, 3), (False, 1)])
def test_gradients_reach_every_student_parameter_through_all_inner_steps(rollout, head_calls):
    module = tiny_dmd(rollout=rollout, student={"kind": "tmd", "head_blocks": 1, "inner_steps": 3})
    net = module.student.net
    with torch.no_grad():  # move the zero-initialised fusion and gap layers off zero, as training does
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    outputs, head = [], net.head

    def recording_head(*args, **kwargs):
        out = head(*args, **kwargs)
        out.retain_grad()
        outputs.append(out)
        return out

    net.head = recording_head
    x, context = torch.randn(2, 3, 2, 8, 8), torch.randn(2, 5, 16)
    module.student_sample(x, context).square().mean().backward()
    assert len(outputs) == head_calls
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)
    missing = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_each_role_brings_its_own_optimizer_and_schedule():
    module = tiny_dmd(student={"kind": "tmd", "head_blocks": 1, "optim": {"lr": 2e-5, "warmup_steps": 0}},
                      critic={"discriminator": {"blocks": [1], "widths": [8, 8, 8], "mlp_width": 8},
                              "optim": {"lr": 3e-5, "eps": 1e-6}, "lr_discriminator": 4e-5})
    (student, critic), schedules = module.configure_optimizers()
    assert [(g["name"], g["lr"]) for g in student.param_groups] == [("student", 2e-5)]
    assert [(g["name"], g["lr"], g["eps"]) for g in critic.param_groups] == [("fake_score", 3e-5, 1e-6),
                                                                          ("discriminator", 4e-5, 1e-6)]
    discriminator = {id(p) for p in module.critic.discriminator.parameters()}
    assert {id(p) for p in critic.param_groups[1]["params"]} == discriminator
    assert [type(s["scheduler"]).__name__ for s in schedules] == ["LambdaLR", "LambdaLR"]
    assert module.critic.configure_optimizers()["optimizer"].param_groups[0]["lr"] == 3e-5  # the same source


def test_each_role_schedule_spans_the_steps_that_role_takes():
    disc = {"blocks": [1], "widths": [8, 8, 8], "mlp_width": 8}
    cosine = {"schedule": "cosine", "min_lr_ratio": 0.0, "warmup_steps": 0}
    module = tiny_dmd(student={"kind": "tmd", "head_blocks": 1, "optim": cosine},
                      critic={"discriminator": disc, "optim": cosine}, student_every=5)
    module._trainer = SimpleNamespace(max_steps=10)  # 10 iterations: 2 student steps, 8 critic steps
    _, (student, critic) = module.configure_optimizers()
    student_factor, critic_factor = student["scheduler"].lr_lambdas[0], critic["scheduler"].lr_lambdas[0]
    assert student_factor(1) == 1.0 and student_factor(2) == 0.0
    assert 0.0 < critic_factor(2) < 1.0 and critic_factor(8) == 0.0


def test_checkpoint_of_the_earlier_argument_layout_loads(tmp_path):
    module = tiny_dmd()
    discriminator = {"blocks": [1, 3], "widths": [8, 8, 8], "mlp_width": 8}
    legacy = {"model": module.hparams.model, "student": {"kind": "tmd", "head_blocks": 1, "inner_steps": 2},
              "discriminator": discriminator, "t_shift": 3.0, "lr_student": 2e-5, "lr_critic": 3e-5,
              "lr_discriminator": 4e-5, "betas": [0.9, 0.99], "weight_decay": 0.01, "adam_eps": 1e-8}
    state = {k.replace("critic.discriminator.", "discriminator."): v for k, v in module.state_dict().items()}
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": legacy, "pytorch-lightning_version": L.__version__}, path)
    assert DMDModule.upgrade_hparams(dict(module.hparams)) == {}
    loaded = DMDModule.load_from_checkpoint(path, **DMDModule.upgrade_hparams(legacy))
    assert loaded.critic.hparams.t_shift == 3.0 and loaded.critic.hparams.lr_discriminator == 4e-5
    assert loaded.student.optim.lr == 2e-5 and loaded.student.optim.warmup_steps == 0
    assert loaded.critic.optim.lr == 3e-5 and loaded.critic.optim.eps == 1e-8
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in module.state_dict().items())


def test_student_input_is_noised_data_on_the_outer_grid_or_backward_simulated():
    module = tiny_dmd(student={"kind": "one_pass", "outer_steps": 3})
    x, context = torch.randn(64, 3, 2, 8, 8), torch.randn(64, 5, 16)
    x_t, t, noise = module.student_input(x, context)
    grid = module.student.outer_grid()
    assert set(t.tolist()) == set(grid[:-1].tolist())
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1, 1).float()) * x + t.view(-1, 1, 1, 1, 1).float() * noise)

    module.hparams.backward_simulation = True
    torch.manual_seed(3)
    x_t, t, noise = module.student_input(x, context)
    first = t == grid[0]
    assert torch.equal(x_t[first], noise[first])  # the first outer step starts from pure noise
    row = (t == grid[2]).nonzero()[0]  # two no-grad student steps from its noise
    ones = torch.ones(1, dtype=torch.float64)
    expected = noise[row]
    for i in range(2):
        expected = module.student.outer_step(expected, grid[i] * ones, grid[i + 1] * ones, context[row])
    torch.testing.assert_close(x_t[row], expected, atol=1e-5, rtol=1e-5)


def test_eq18_sampling_is_euler_on_the_outer_grid(smoke_checkpoint):
    teacher = TeacherModule.load_from_checkpoint(smoke_checkpoint).eval()
    student = OnePassStudent(teacher.hparams.model, outer_steps=3, outer_shift=10.0, ema_decay=None)
    student.net.load_state_dict(teacher.sampling_net().state_dict())
    context, noise = torch.randn(2, 16, 16), torch.randn(2, 3, 4, 16, 16)
    ours, nfe = student.sample(context, noise=noise)
    euler, _ = teacher.sample(context, noise=noise, steps=3, shift=10.0, guidance_scale=1.0)
    assert nfe == 3.0
    torch.testing.assert_close(ours, euler, atol=1e-5, rtol=1e-4)


STAGE2_EXPERIMENTS = ["shapes_tmd", "shapes_tmd_1step", "shapes_dmd2v", "shapes_dmd2v_1step"]


@pytest.mark.parametrize("experiment", STAGE2_EXPERIMENTS)
def test_stage2_experiment_fast_dev_run(experiment, smoke_checkpoint, smoke_student_checkpoint, tmp_path):
    """Each experiment as configured, on the smoke teacher's sizes: one student and one critic iteration."""
    tmd = experiment.startswith("shapes_tmd")
    student = smoke_student_checkpoint if tmd else smoke_checkpoint  # a teacher checkpoint is a one-pass student
    overrides = [f"experiment={experiment}", *SMOKE_SIZES, f"stage.module.teacher_ckpt={smoke_checkpoint}",
                 f"stage.module.student_ckpt={student if experiment != 'shapes_dmd2v' else 'null'}",
                 "trainer.fast_dev_run=2"]
    if tmd:
        overrides += ["stage.module.student.head_blocks=1", "stage.module.student.inner_steps=2",
                      f"stage.module.student.outer_steps={2 if experiment == 'shapes_tmd' else 1}"]
    if experiment == "shapes_tmd_1step":  # the smoke stage-1 student was trained for M = 2
        overrides += ["stage.module.student_ckpt=null"]
    cfg = compose_train(overrides, tmp_path)
    assert cfg.stage.module.student.kind == ("tmd" if tmd else "one_pass")
    metrics = train(cfg)
    assert "train/vsd" in metrics and "train/critic_loss" in metrics
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_kd_warmup_generates_caches_and_regresses_teacher_pairs(smoke_checkpoint, tmp_path):
    overrides = ["experiment=shapes_kd", "model=wan_smoke", "data=shapes_smoke", *SMOKE_TEXT, "data=teacher_pairs",
                 "data.speed=0.06",
                 "data.frames=4", "data.size=16", "data.batch_size=4", "data.val_batch_size=4",
                 f"stage.module.teacher_ckpt={smoke_checkpoint}", "data.num_pairs=8", "data.num_val_pairs=4",
                 "data.steps=2", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=4",
                 "trainer.val_check_interval=4", "callbacks.samples.every_n_steps=0"]
    cfg = compose_train(overrides, tmp_path / "run")
    metrics = train(cfg)
    assert "train/kd_loss" in metrics and "val/kd_loss" in metrics
    (cache,) = (tmp_path / "cache").glob("pairs_*")
    stamps = {path: path.stat().st_mtime_ns for path in cache.iterdir()}
    assert sorted(path.name for path in stamps) == ["train_00000.safetensors", "val_00000.safetensors"]
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # the cache is reused, not regenerated
    assert {path: path.stat().st_mtime_ns for path in cache.iterdir()} == stamps
    pairs = datamodule.pairs["train"].read()
    assert len(pairs["noise"]) == 8
    teacher = TeacherModule.load_from_checkpoint(smoke_checkpoint).eval()
    context = datamodule.prompts(datamodule.captions("train", 0, 2)).states
    negative = datamodule.prompts.negative(2).states
    assert teacher.hparams.guidance_scale == 4.0  # data.guidance_scale=null: the CFG the teacher samples with
    expected, _ = teacher.sample(context, negative, noise=pairs["noise"][:2], steps=2, guidance_scale=4.0, shift=3.0)
    torch.testing.assert_close(pairs["video"][:2], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["stage.module.student_ckpt=/no/such.ckpt"], FileNotFoundError, "student_ckpt"),
        (["stage.module.teacher_ckpt=null"], ValueError, "teacher_ckpt is null"),
        (["stage.module.student.inner_steps=4"], ValueError, "inner_steps=4"),
        (["stage.module.student.outer_shift=3.0"], ValueError, "outer_shift=3.0 but stage.module.student_ckpt"),
        (["stage.module.critic.discriminator.blocks=[1,3]"], ValueError, "discriminator.blocks"),
        (["stage/student@stage.module.student=one_pass", "~stage.module.student.head_blocks"], ValueError,
         "holds a tmd student"),
        (["stage/student@stage.module.student=one_pass"], ValueError, r"\['head_blocks'\] do not apply"),
    ],
)
def test_bad_stage2_config_fails_before_training(smoke_checkpoint, smoke_student_checkpoint, tmp_path, overrides,
                                                 error, message):
    cfg = dmd_cfg(tmp_path, smoke_checkpoint, smoke_student_checkpoint, *overrides)
    with pytest.raises(error, match=message):
        train(cfg)


def test_real_score_guidance_is_the_teachers_sampling_cfg_unless_set(smoke_checkpoint, smoke_student_checkpoint,
                                                                     tmp_path, monkeypatch):
    scales = []
    guided = TeacherModule.guided_velocity

    def recording(self, x_t, t, context, negative_context, scale, net=None):
        scales.append(scale)
        return guided(self, x_t, t, context, negative_context, scale, net)

    monkeypatch.setattr(TeacherModule, "guided_velocity", recording)
    teacher_cfg = TeacherModule.load_from_checkpoint(smoke_checkpoint).hparams.guidance_scale
    for name, overrides, expected in (("default", [], teacher_cfg), ("set", ["stage.module.guidance_scale=1.5"], 1.5)):
        scales.clear()
        train(dmd_cfg(tmp_path / name, smoke_checkpoint, smoke_student_checkpoint, "trainer.max_steps=1",
                      "callbacks.checkpoint.every_n_train_steps=1", *overrides))
        assert scales == [expected]
        saved = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)
        assert saved["real_guidance"] == expected
    assert teacher_cfg == 4.0
    with pytest.raises(ValueError, match="guidance_scale=0"):
        tiny_dmd(guidance_scale=0.0)


def test_stage2_takes_the_student_shape_of_its_stage1_checkpoint(smoke_checkpoint, tmp_path):
    """No shape overrides in stage 2: H, M, N, the grid shifts, fusion and inner target are the stage-1
    checkpoint's, in the config the run records and in the student it builds."""
    from lightning_tmd.checks import STUDENT_ARCHITECTURE, check_config

    shape = {"head_blocks": 1, "outer_steps": 3, "inner_steps": 3, "outer_shift": 3.0, "inner_shift": 5.0,
             "fusion": "concat", "inner_target": "sample"}
    stage1 = tmp_path / "stage1"
    train(compose_train(["experiment=shapes_smoke_tm", f"stage.module.teacher_ckpt={smoke_checkpoint}",
                         "trainer.max_steps=2", "callbacks.samples.every_n_steps=0",
                         *[f"stage.module.{k}={v}" for k, v in shape.items()]], stage1))
    cfg = dmd_cfg(tmp_path / "stage2", smoke_checkpoint, stage1 / "checkpoints" / "last.ckpt",
                  "~stage.module.student.head_blocks")
    assert all(cfg.stage.module.student.get(key) is None for key in STUDENT_ARCHITECTURE)
    check_config(cfg)
    assert {key: cfg.stage.module.student[key] for key in STUDENT_ARCHITECTURE} == shape
    module = instantiate(cfg.stage.module, _convert_="all")
    assert {key: module.student.hparams[key] for key in STUDENT_ARCHITECTURE} == shape
    assert module.student.net.head_blocks == 1 and module.student.net.inner_target == "sample"
