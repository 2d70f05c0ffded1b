"""TMDScheduler and OnePassScheduler: the students' grids and effective NFE as the written-out formulas give
them, the Eq. 4 / 13 / 18 updates, refused zero steps, save / load, and TMDPipeline's scheduler component
(saved, loaded, and built from the student's config for folders exported without one)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_WAN

from lightning_tmd.diffusers_pipeline import TMDPipeline, TMDStudentModel
from lightning_tmd.modules.one_pass import OnePassStudent
from lightning_tmd.modules.student import StudentModule
from lightning_tmd.schedulers import OnePassScheduler, TMDScheduler
from lightning_tmd.schedules import shifted_grid

# (M, N, outer gamma, inner gamma, H, L, t_max)
TABLE = [
    (1, 1, 10.0, 10.0, 5, 30, 0.999),
    (1, 2, 10.0, 10.0, 5, 30, 0.999),
    (2, 2, 10.0, 10.0, 5, 30, 0.999),
    (2, 4, 5.0, 3.0, 5, 40, 0.999),
    (4, 3, 5.0, 1.0, 2, 6, 0.999),
    (3, 1, 1.0, 10.0, 1, 3, 1.0),
    (7, 5, 2.5, 7.0, 3, 10, 0.99),
]
CONFIG = {**TINY_WAN, "patch_size": list(TINY_WAN["patch_size"])}
TEXT = {"kind": "embeddings", "dim": 16, "max_length": 5, "negative_prompt": ""}


def written_out_grid(steps: int, gamma: float, t_max: float) -> torch.Tensor:
    """schedules.shifted_grid written out: uniform on [0, t_max] from t_max down, shifted by
    sigma(u) = gamma u / ((gamma - 1) u + 1), the first time kept at t_max."""
    u = torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)
    grid = gamma * u / ((gamma - 1.0) * u + 1.0)
    grid[0] = t_max
    return grid


def closed_form_grid(steps: int, gamma: float, t_max: float) -> list[float]:
    """t_i = sigma(t_max i / steps) for i = steps - 1 .. 0, after t_max."""
    return [t_max] + [gamma * u / ((gamma - 1) * u + 1) for u in (t_max * i / steps for i in range(steps - 1, -1, -1))]


def eq16(m: int, n: int, h: int, blocks: int) -> float:
    return m * (1 + (n - 1) * h / blocks)


def tmd_scheduler(m, n, g_out, g_in, h, blocks, t_max) -> TMDScheduler:
    return TMDScheduler(outer_steps=m, inner_steps=n, outer_shift=g_out, inner_shift=g_in, head_blocks=h,
                        num_blocks=blocks, t_max=t_max)


@pytest.mark.parametrize(("m", "n", "g_out", "g_in", "h", "blocks", "t_max"), TABLE)
def test_tmd_grids_and_effective_nfe_are_the_formulas(m, n, g_out, g_in, h, blocks, t_max):
    scheduler = tmd_scheduler(m, n, g_out, g_in, h, blocks, t_max)
    outer, inner = written_out_grid(m, g_out, t_max), written_out_grid(n, g_in, t_max)
    assert torch.equal(scheduler.outer_grid(), outer) and torch.equal(scheduler.inner_grid(), inner)
    assert torch.equal(outer, shifted_grid(m, g_out, t_max)) and torch.equal(inner, shifted_grid(n, g_in, t_max))
    torch.testing.assert_close(outer, torch.tensor(closed_form_grid(m, g_out, t_max), dtype=torch.float64),
                               atol=1e-12, rtol=0)
    assert torch.equal(scheduler.timesteps, outer) and torch.equal(scheduler.inner_timesteps, inner)
    assert scheduler.effective_nfe() == eq16(m, n, h, blocks)
    # call-time settings replace the defaults
    scheduler.set_timesteps(outer_steps=n, inner_steps=m, outer_shift=g_in, inner_shift=g_out)
    assert torch.equal(scheduler.timesteps, written_out_grid(n, g_in, t_max))
    assert torch.equal(scheduler.inner_timesteps, written_out_grid(m, g_out, t_max))
    assert (scheduler.num_inference_steps, scheduler.num_inner_steps) == (n, m)
    assert scheduler.effective_nfe(n, m) == eq16(n, m, h, blocks)
    assert torch.equal(scheduler.outer_grid(), outer)  # the defaults stay


@pytest.mark.parametrize(("m", "n", "h", "blocks", "expected"), [
    (1, 2, 5, 30, 7 / 6), (2, 2, 5, 30, 7 / 3), (1, 4, 5, 40, 1.375), (2, 4, 5, 40, 2.75), (2, 2, 2, 6, 8 / 3),
])
def test_effective_nfe_matches_the_paper_table(m, n, h, blocks, expected):
    assert TMDScheduler(m, n, head_blocks=h, num_blocks=blocks).effective_nfe() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("m", "g_out", "t_max"), [(1, 10.0, 0.999), (2, 10.0, 0.999), (4, 5.0, 0.999),
                                                   (3, 1.0, 1.0)])
def test_one_pass_grid_and_nfe_are_the_formulas(m, g_out, t_max):
    scheduler = OnePassScheduler(outer_steps=m, outer_shift=g_out, t_max=t_max)
    assert torch.equal(scheduler.outer_grid(), written_out_grid(m, g_out, t_max))
    assert torch.equal(scheduler.timesteps, written_out_grid(m, g_out, t_max))
    assert scheduler.effective_nfe() == float(m) and scheduler.effective_nfe(m + 1, 4) == float(m + 1)
    scheduler.set_timesteps(outer_steps=m + 2, inner_steps=0, inner_shift=-1.0)  # no inner grid: ignored
    assert torch.equal(scheduler.timesteps, written_out_grid(m + 2, g_out, t_max))
    assert not hasattr(scheduler, "inner_grid") and not hasattr(scheduler, "inner_timesteps")


@pytest.mark.parametrize(("setting", "message"), [
    ({"outer_steps": 0}, "outer_steps must be a positive integer"),
    ({"outer_steps": -1}, "outer_steps must be a positive integer"),
    ({"inner_steps": 0}, "inner_steps must be a positive integer"),
    ({"outer_steps": 1.5}, "outer_steps must be a positive integer"),
    ({"outer_shift": 0.0}, "outer_shift must be a positive number"),
    ({"inner_shift": -2.0}, "inner_shift must be a positive number"),
])
def test_zero_or_negative_settings_are_refused(setting, message):
    scheduler = TMDScheduler(2, 2, head_blocks=2, num_blocks=6)
    before = scheduler.timesteps.clone(), scheduler.inner_timesteps.clone()
    with pytest.raises(ValueError, match=message):
        scheduler.set_timesteps(**setting)
    assert torch.equal(scheduler.timesteps, before[0]) and torch.equal(scheduler.inner_timesteps, before[1])
    with pytest.raises(ValueError, match=message):
        TMDScheduler(**{"head_blocks": 2, "num_blocks": 6, **setting})
    if "steps" in next(iter(setting)):
        with pytest.raises(ValueError, match=message):
            scheduler.effective_nfe(**setting)
    if "outer" in next(iter(setting)):
        with pytest.raises(ValueError, match=message):
            OnePassScheduler().set_timesteps(**setting)
        with pytest.raises(ValueError, match=message):
            OnePassScheduler(**setting)
    with pytest.raises(ValueError, match="head_blocks must be a positive integer"):
        TMDScheduler(head_blocks=0)


def test_updates_are_eqs_4_13_and_18():
    g = torch.Generator().manual_seed(0)
    x_t, v, u = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    t, t_next = torch.tensor([0.8, 0.5], dtype=torch.float64), torch.tensor([0.3, 0.0], dtype=torch.float64)
    gap = (t - t_next).float().view(-1, 1, 1)
    assert torch.equal(TMDScheduler.outer_step(x_t, t, t_next, v), x_t - gap * v)  # Eq. 4
    assert torch.equal(TMDScheduler.inner_step(x_t, 0.9, 0.25, u), x_t - 0.65 * u)  # Eq. 13
    x0 = x_t - t.float().view(-1, 1, 1) * v
    ratio = (t_next / t).float().view(-1, 1, 1)
    eq18 = OnePassScheduler.outer_step(x_t, t, t_next, x0)
    assert torch.equal(eq18, (1 - ratio) * x0 + ratio * x_t)
    torch.testing.assert_close(eq18, x_t - gap * v)  # Eq. 18 from x0 = x_t - t v is an Euler step


@pytest.mark.parametrize("scheduler", [TMDScheduler(3, 4, 5.0, 2.0, head_blocks=2, num_blocks=6, t_max=0.99),
                                       OnePassScheduler(4, 5.0)])
def test_save_pretrained_round_trip(scheduler, tmp_path):
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = type(scheduler).from_pretrained(tmp_path)
    public = {k: v for k, v in loaded.config.items() if not k.startswith("_")}
    assert public == {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    assert torch.equal(loaded.timesteps, scheduler.outer_grid())
    assert loaded.effective_nfe(2, 3) == scheduler.effective_nfe(2, 3)


def test_student_modules_sample_on_their_schedulers():
    torch.manual_seed(0)
    tmd = StudentModule(model={"config": CONFIG}, head_blocks=1, outer_steps=3, inner_steps=2, inner_shift=4.0)
    c = tmd.scheduler.config
    assert (c.outer_steps, c.inner_steps, c.outer_shift, c.inner_shift, c.head_blocks, c.num_blocks, c.t_max) == (
        3, 2, 10.0, 4.0, 1, 3, 0.999)
    assert torch.equal(tmd.outer_grid(2, 5.0), written_out_grid(2, 5.0, 0.999))
    assert torch.equal(tmd.inner_grid(), written_out_grid(2, 4.0, 0.999))
    assert tmd.effective_nfe(2, 4) == eq16(2, 4, 1, 3)
    one = OnePassStudent(model={"config": CONFIG}, outer_steps=2, outer_shift=5.0)
    assert isinstance(one.scheduler, OnePassScheduler) and one.scheduler.config.outer_shift == 5.0
    assert torch.equal(one.outer_grid(), written_out_grid(2, 5.0, 0.999)) and one.effective_nfe(3) == 3.0


def tiny_pipeline(kind: str = "tmd") -> tuple[TMDPipeline, torch.nn.Module]:
    """A TMDPipeline beside the module whose weights it holds (no training, no export)."""
    torch.manual_seed(0)
    if kind == "tmd":
        module = StudentModule(model={"config": CONFIG}, head_blocks=1, outer_steps=2, inner_steps=3)
        extra = dict(head_blocks=1, inner_steps=3, inner_shift=10.0, fusion="gated", inner_target="velocity")
    else:
        module = OnePassStudent(model={"config": CONFIG}, outer_steps=2, outer_shift=5.0)
        extra = {}
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    student = TMDStudentModel(kind=kind, transformer=CONFIG, sample_shape=[3, 2, 8, 8], text=TEXT,
                              negative_prompt_shape=[5, 16], outer_steps=2, outer_shift=module.hparams.outer_shift,
                              **extra)
    student.net.load_state_dict(module.net.state_dict())
    pipe = TMDPipeline(student=student.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe, module.eval()


@pytest.mark.parametrize("kind", ["tmd", "one_pass"])
def test_pipeline_samples_what_the_module_samples(kind):
    pipe, module = tiny_pipeline(kind)
    context = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    for steps in ({}, {"outer_steps": 1, "inner_steps": 4}, {"outer_steps": 3, "outer_shift": 3.0, "inner_shift": 2.0}):
        clips, nfe = module.sample(context, noise=noise, **steps)
        out = pipe(prompt_embeds=context, latents=noise, output_type="latent", **steps)
        assert torch.equal(out.frames, clips) and out.nfe == nfe
        assert torch.equal(pipe.scheduler.timesteps, module.outer_grid(steps.get("outer_steps"),
                                                                       steps.get("outer_shift")))


def test_pipeline_saves_and_loads_its_scheduler_and_reads_folders_without_one(tmp_path):
    pipe, _ = tiny_pipeline("tmd")
    assert isinstance(pipe.scheduler, TMDScheduler) and pipe.scheduler.config.num_blocks == 3
    pipe.save_pretrained(tmp_path / "new")
    config = json.loads((tmp_path / "new" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "TMDScheduler" and (config["outer_steps"], config["inner_steps"]) == (2, 3)
    index = json.loads((tmp_path / "new" / "model_index.json").read_text())
    assert index["scheduler"] == ["lightning_tmd.schedulers", "TMDScheduler"]
    # a folder exported before schedulers were saved: no scheduler/, no entry in model_index.json
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    shutil.rmtree(tmp_path / "old" / "scheduler")
    del index["scheduler"]
    (tmp_path / "old" / "model_index.json").write_text(json.dumps(index))
    context, noise = torch.randn(1, 5, 16), torch.randn(1, 3, 2, 8, 8)
    expected = pipe(prompt_embeds=context, latents=noise, output_type="latent").frames
    frames = {}
    for folder in ("new", "old"):
        loaded = TMDPipeline.from_pretrained(tmp_path / folder)
        loaded.set_progress_bar_config(disable=True)
        assert isinstance(loaded.scheduler, TMDScheduler)
        assert {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")} == {
            k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        frames[folder] = loaded(prompt_embeds=context, latents=noise, output_type="latent").frames
        torch.testing.assert_close(frames[folder], expected, atol=1e-6, rtol=0)  # a loaded Wan: last-bit noise
    assert torch.equal(frames["old"], frames["new"])
    # a swapped-in scheduler sets the defaults
    swapped = TMDPipeline.from_pretrained(tmp_path / "new", scheduler=TMDScheduler(1, 4, head_blocks=1, num_blocks=3))
    assert swapped.scheduler.config.outer_steps == 1
    assert swapped(prompt_embeds=context, latents=noise, output_type="latent").nfe == eq16(1, 4, 1, 3)


def test_pipeline_refuses_a_scheduler_of_another_student():
    pipe, _ = tiny_pipeline("tmd")
    with pytest.raises(ValueError, match="a tmd student samples with a TMDScheduler, got OnePassScheduler"):
        TMDPipeline(student=pipe.student, scheduler=OnePassScheduler())
    with pytest.raises(ValueError, match=r"\(head_blocks, num_blocks\) = \(5, 30\) but the student has \(1, 3\)"):
        TMDPipeline(student=pipe.student, scheduler=TMDScheduler())
    one, _ = tiny_pipeline("one_pass")
    assert isinstance(one.scheduler, OnePassScheduler) and one.scheduler.config.outer_shift == 5.0
    with pytest.raises(ValueError, match="a one_pass student samples with a OnePassScheduler"):
        TMDPipeline(student=one.student, scheduler=TMDScheduler(head_blocks=1, num_blocks=3))
