import json
import shutil

import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lightning_tmd.evaluate import evaluate
from lightning_tmd.generators import load_generator
from lightning_tmd.sample import sample


def compose_app(name, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_sample_app_writes_videos_grid_and_tensors(smoke_checkpoint, tmp_path):
    cfg = compose_app("sample", [f"ckpt={smoke_checkpoint}", f"out_dir={tmp_path}", "seeds=[3,4]",
                                 "prompts=[a red circle moving up,a blue square moving left]", "+sampler.steps=3"])
    result = sample(cfg)
    assert sorted(p.name for p in tmp_path.glob("*.gif")) == ["000_a_red_circle_moving_up.gif",
                                                              "001_a_blue_square_moving_left.gif"]
    assert (tmp_path / "grid.png").is_file()
    saved = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert saved["videos"].shape == (4, 4, 16, 16, 3) and saved["videos"].dtype == torch.uint8
    assert saved["prompts"] == ["a red circle moving up"] * 2 + ["a blue square moving left"] * 2
    assert saved["seeds"] == [3, 4, 3, 4] and saved["nfe"] == 6 and saved["sampler"] == {"steps": 3}
    assert torch.equal(saved["videos"], result["videos"])
    # a (prompt, seed) pair gives the same clip in another batch
    again = sample(compose_app("sample", [f"ckpt={smoke_checkpoint}", f"out_dir={tmp_path / 'again'}", "seeds=[4]",
                                          "prompts=[a red circle moving up]", "+sampler.steps=3"]))
    assert (again["videos"][0].int() - saved["videos"][1].int()).abs().max() <= 1


def test_sampling_twice_into_one_folder_is_refused_unless_overwrite_replaces_every_earlier_output(smoke_checkpoint,
                                                                                                   tmp_path):
    args = [f"ckpt={smoke_checkpoint}", f"out_dir={tmp_path}", "seeds=[0]", "+sampler.steps=2"]
    sample(compose_app("sample", [*args, "prompts=[a red circle moving up,a blue square moving left]"]))
    (tmp_path / "notes.txt").write_text("not a sample")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = [*args, "prompts=[a green triangle moving down]"]
    with pytest.raises(FileExistsError, match=r"out_dir: .* holds the outputs of an earlier run \(000_a_red_circle_"
                                              r"moving_up.gif, 001_a_blue_square_moving_left.gif, grid.png, "
                                              r"samples.pt\).*overwrite=true"):
        sample(compose_app("sample", again))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    sample(compose_app("sample", [*again, "overwrite=true"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_a_green_triangle_moving_down.gif", "grid.png",
                                                          "notes.txt", "samples.pt"]  # no old GIF beside the new one
    assert torch.load(tmp_path / "samples.pt", weights_only=True)["prompts"] == ["a green triangle moving down"]


def test_sample_app_rejects_missing_inputs(smoke_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt"):
        sample(compose_app("sample", [f"ckpt={tmp_path / 'none.ckpt'}", f"out_dir={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match="prompts_file"):
        sample(compose_app("sample", [f"ckpt={smoke_checkpoint}", f"out_dir={tmp_path}",
                                      f"prompts_file={tmp_path / 'none.txt'}"]))


def test_ema_false_samples_the_raw_training_weights(smoke_checkpoint, tmp_path):
    raw = load_generator(smoke_checkpoint, ema=False)
    assert raw.module.ema is None and raw.module.sampling_net() is raw.module.net and not raw.ema
    averaged = load_generator(smoke_checkpoint).module
    assert any(not torch.equal(a, b) for a, b in zip(averaged.ema.module.parameters(), raw.module.net.parameters()))
    args = [f"ckpt={smoke_checkpoint}", "seeds=[0]", "prompts=[a red circle moving up]", "+sampler.steps=3"]
    first = sample(compose_app("sample", [*args, f"out_dir={tmp_path / 'ema'}"]))["videos"]
    second = sample(compose_app("sample", [*args, f"out_dir={tmp_path / 'raw'}", "ema=false"]))["videos"]
    assert not torch.equal(first, second)


def test_generator_loads_with_its_prompt_encoder(smoke_checkpoint):
    loaded = load_generator(smoke_checkpoint)
    assert loaded.clip_shape == (3, 4, 16, 16)
    assert loaded.prompts.dim == loaded.module.net.config.text_dim
    assert not loaded.module.training


def test_evaluate_app_end_to_end(smoke_checkpoint, tiny_judge, tmp_path):
    judge_path = tiny_judge[0]
    overrides = [f"models.teacher.ckpt={smoke_checkpoint}", f"out_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}",
                 f"judge.path={judge_path}", "num_samples=16", "batch_size=16", "latency.repeats=1",
                 "latency.batch_size=2", "~models.teacher.settings",
                 "+models.teacher.settings={one: {steps: 1}, two: {steps: 2, guidance_scale: 1.0}}"]
    rows = evaluate(compose_app("evaluate", overrides))
    assert [(r["model"], r["setting"]) for r in rows] == [
        ("real", "real vs real"), ("real", "real vs shuffled frames"), ("teacher", "one"), ("teacher", "two")]
    assert rows[2]["nfe"] == 2 and rows[3]["nfe"] == 2
    for row in rows:
        assert 0 <= row["adherence"] <= 1 and row["fvd"] >= 0
    for row in rows[2:]:
        assert row["latency_s"] > 0 and row["clips_per_s"] > 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rows"] == json.loads(json.dumps(rows))
    table = (tmp_path / "table.md").read_text()
    assert "| teacher | one | 2 |" in table and "FVD-shapes" in table
    # a second run into the same folder is refused: it would replace metrics.json and table.md
    with pytest.raises(FileExistsError, match=r"out_dir: .* holds the outputs of an earlier run \(metrics.json, "
                                              r"table.md\).*overwrite=true"):
        evaluate(compose_app("evaluate", overrides))
    assert (tmp_path / "table.md").read_text() == table
    # with overwrite=true it reuses the cached sample sets (cache_dir is kept) and gives the same numbers
    again = evaluate(compose_app("evaluate", [*overrides, "overwrite=true"]))
    assert [r["fvd"] for r in again] == [r["fvd"] for r in rows]
    assert len(list((tmp_path / "cache" / "samples").glob("*.pt"))) == 2
    # ... keyed by the checkpoint's content: a copy in another folder hits the same sets
    moved = tmp_path / "moved" / "last.ckpt"
    moved.parent.mkdir()
    shutil.copy(smoke_checkpoint, moved)
    evaluate(compose_app("evaluate", [f"models.teacher.ckpt={moved}", *overrides[1:], "overwrite=true"]))
    assert len(list((tmp_path / "cache" / "samples").glob("*.pt"))) == 2
