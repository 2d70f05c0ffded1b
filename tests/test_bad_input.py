"""Bad sampler settings are errors that name the field, never silent defaults."""

from __future__ import annotations

import pytest
import torch
from test_apps import compose_app

from lightning_tmd.generators import load_generator
from lightning_tmd.sample import sample
from lightning_tmd.schedules import shift_setting, steps_setting


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
