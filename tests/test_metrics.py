import json
import logging

import pytest
import torch

from lightning_tmd.data.shapes import DEFAULT_SPEED, ShapesDataset, stacked
from lightning_tmd.metrics import judge as judge_module
from lightning_tmd.metrics.judge import (
    JudgeFeatures,
    ensure_judge,
    judge_accuracy,
    judge_file_name,
    load_judge,
    per_color_targets,
    read_alike,
    shape_confusion,
    training_key,
)
from lightning_tmd.metrics.video import (
    fake_distance,
    frechet_video_distance,
    shuffle_frames,
    temporal_consistency,
    update_in_batches,
)


def clips(count, start=0, **kw):
    batch = stacked(ShapesDataset(count, start=start, frames=4, size=16, **kw))
    return batch["videos"], batch["labels"]


def test_per_color_targets_follow_the_object_slots():
    labels = {"color": torch.tensor([[2, -1], [0, 5]]), "shape": torch.tensor([[1, -1], [2, 0]]),
              "direction": torch.tensor([[7, -1], [3, 4]])}
    target = per_color_targets(labels)
    assert target["present"].tolist() == [[0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1]]
    assert target["shape"][1].tolist() == [2, -1, -1, -1, -1, 0]
    assert target["direction"][0, 2] == 7


def test_judge_beats_chance_by_a_wide_margin(tiny_judge):
    _, _, accuracy = tiny_judge
    # chance: count 1/2, colour ~1/4, shape 1/3, direction 1/8
    assert accuracy["count"] > 0.9
    assert accuracy["color"] > 0.8
    assert accuracy["shape"] > 0.6
    assert accuracy["direction"] > 0.5


def test_cached_judge_loads_and_refuses_other_clip_settings(tiny_judge):
    path, net, _ = tiny_judge
    loaded, info = load_judge(path, {"frames": 4, "size": 16, "max_objects": 2})
    video, _ = clips(4)
    torch.testing.assert_close(loaded.features(video), net.features(video))
    assert set(info["accuracy"]) == {"count", "color", "shape", "direction", "all", "all_1obj", "all_2obj",
                                     "direction_1obj", "direction_2obj", "same_shape_2obj", "same_direction_2obj"}
    with pytest.raises(ValueError, match="judge.path"):
        load_judge(path, {"frames": 8, "size": 16, "max_objects": 2})
    with pytest.raises(ValueError, match="speed"):
        load_judge(path, {"frames": 4, "size": 16, "max_objects": 2, "speed": 0.09})
    with pytest.raises(FileNotFoundError, match="judge.path"):
        load_judge(path.parent / "missing.pt")


def test_training_the_judge_is_announced_once_with_its_expected_time(tmp_path, caplog):
    path = tmp_path / "judge.pt"
    settings = dict(steps=2, batch_size=4, width=8, num_features=16, num_val=16)
    with caplog.at_level(logging.INFO, logger="lightning_tmd.metrics.judge"):
        ensure_judge(path, 4, 16, 1, **settings)
        ensure_judge(path, 4, 16, 1, **settings)  # cached: loaded, not trained again
    (announcement,) = [r.getMessage() for r in caplog.records if r.name == "lightning_tmd.metrics.judge"]
    assert announcement.startswith("Training the shapes judge first (original, 2 steps of batch 4 on 4 x 16 x 16")
    assert "expected time under a minute" in announcement and str(path) in announcement


def test_judges_cached_without_a_speed_count_as_the_default_speed(tiny_judge, tmp_path):
    path, _, _ = tiny_judge
    saved = torch.load(path, weights_only=True)
    saved["data"].pop("speed")
    torch.save(saved, tmp_path / "old.pt")
    load_judge(tmp_path / "old.pt", {"frames": 4, "size": 16, "max_objects": 2, "speed": DEFAULT_SPEED})
    with pytest.raises(ValueError, match="speed"):
        load_judge(tmp_path / "old.pt", {"frames": 4, "size": 16, "max_objects": 2, "speed": 0.09})
    assert judge_file_name({"frames": 8, "size": 32, "max_objects": 2, "speed": DEFAULT_SPEED}) == "judge_8x32_o2.pt"
    assert judge_file_name({"frames": 8, "size": 32, "max_objects": 2, "speed": 0.09}) == "judge_8x32_o2_v0.09.pt"



def test_every_setting_that_changes_a_judge_changes_its_file_name(monkeypatch):
    data = {"frames": 8, "size": 32, "max_objects": 2, "speed": 0.09}
    default = judge_file_name(data, "outline")
    assert default == judge_file_name(data, "outline", {"steps": 5000, "batch_size": 32, "seed": 0, "width": 32,
                                                        "num_features": 128}) == "judge_8x32_o2_v0.09_outline.pt"
    changed = [{"steps": 1000}, {"batch_size": 16}, {"seed": 1}, {"width": 16}, {"num_features": 64}]
    names = {judge_file_name(data, "outline", training) for training in changed}
    assert len(names) == len(changed) and default not in names
    assert judge_file_name(data, "outline", {"steps": 1000, "seed": 1}) == "judge_8x32_o2_v0.09_outline_s1000_seed1.pt"
    monkeypatch.setattr(judge_module, "JUDGE_VERSION", 2)  # the judge's recipe changed: cached judges are retrained
    assert judge_file_name(data, "outline") == "judge_8x32_o2_v0.09_outline_r2.pt"


def test_a_cached_judge_of_other_training_settings_is_refused(tiny_judge, tmp_path, monkeypatch):
    path, _, _ = tiny_judge  # seed 0, 1500 steps of batch 32, width 16, 64 features
    settings = dict(steps=1500, batch_size=32, width=16, num_features=64)
    ensure_judge(path, 4, 16, 2, **settings)
    for other in ({"seed": 1}, {"width": 32}, {"num_features": 128}):
        with pytest.raises(ValueError, match=next(iter(other))):
            ensure_judge(path, 4, 16, 2, **settings | other)
    saved = torch.load(path, weights_only=True)
    saved["training"] = {k: saved["training"][k] for k in ("variant", "steps", "batch_size")}  # as cached before
    torch.save(saved, tmp_path / "old.pt")
    load_judge(tmp_path / "old.pt", training=training_key("original", **settings))
    monkeypatch.setattr(judge_module, "JUDGE_VERSION", 2)
    with pytest.raises(ValueError, match="version"):
        load_judge(tmp_path / "old.pt", training=training_key("original", **settings))

def test_real_clips_adhere_to_their_own_captions(tiny_judge):
    _, net, _ = tiny_judge
    video, labels = clips(256, start=1 << 41)
    accuracy = judge_accuracy(net, video, labels)
    assert accuracy["color"] > 0.8 and accuracy["count"] > 0.9
    ones = (labels["num_objects"] == 1).float().mean().item()  # the whole is the mix of its parts
    assert accuracy["all"] == pytest.approx(ones * accuracy["all_1obj"] + (1 - ones) * accuracy["all_2obj"])
    objects_1 = ones / (ones + 2 * (1 - ones))
    assert accuracy["direction"] == pytest.approx(
        objects_1 * accuracy["direction_1obj"] + (1 - objects_1) * accuracy["direction_2obj"], abs=1e-6)
    shuffled = {k: v.roll(1, 0) for k, v in labels.items()}  # someone else's captions
    assert judge_accuracy(net, video, shuffled)["all"] < 0.5 * accuracy["all"]


def test_read_alike_only_scores_two_object_captions_that_differ():
    captioned = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1]]).bool()
    target = torch.tensor([[-1, 2, -1, -1, 5, -1], [3, 3, -1, -1, -1, -1], [-1, -1, 1, -1, -1, -1],
                           [0, -1, -1, -1, -1, 6]])
    read = torch.tensor([[0, 5, 0, 0, 5, 0], [3, 3, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 6, 6, 6, 6, 6]])
    same = read_alike(read, target, captioned)
    # clip 0: captioned 2 and 5, both read 5 -> leaked; clip 1: the caption gives both 3 -> not scored;
    # clip 2: one object -> not scored; clip 3: read 0 and 6 as captioned -> told apart
    assert same[0] == 1 and same[1].isnan() and same[2].isnan() and same[3] == 0


def test_leakage_counts_two_objects_read_alike_against_a_caption_that_tells_them_apart(tiny_judge):
    _, net, _ = tiny_judge
    video, labels = clips(512, start=1 << 41)
    real = judge_accuracy(net, video, labels)
    # two-object clips whose objects really move the same way, captioned as if the second one went the
    # opposite way: both read alike although the caption differs
    same = (labels["num_objects"] == 2) & (labels["direction"][:, 0] == labels["direction"][:, 1])
    assert same.sum() >= 8
    leaky = {k: v[same].clone() for k, v in labels.items()}
    leaky["direction"][:, 1] = (leaky["direction"][:, 1] + 4) % 8
    leaked = judge_accuracy(net, video[same], leaky)
    assert leaked["same_direction_2obj"] > real["same_direction_2obj"] + 0.2
    ones = labels["num_objects"] == 1  # no two-object prompt: nothing to measure
    assert "same_direction_2obj" not in judge_accuracy(net, video[ones], {k: v[ones] for k, v in labels.items()})


def test_fvd_is_zero_on_itself_and_grows_with_noise_and_shuffled_frames(tiny_judge):
    _, net, _ = tiny_judge
    real, _ = clips(256, start=1 << 41)
    other, _ = clips(256, start=(1 << 41) + 256)
    fvd = frechet_video_distance(JudgeFeatures(net))
    update_in_batches(fvd, real, real=True)
    itself = fake_distance(fvd, real)
    floor = fake_distance(fvd, other)
    noised = fake_distance(fvd, (other + torch.randn_like(other)).clamp(-1, 1))
    shuffled = fake_distance(fvd, shuffle_frames(other, torch.Generator().manual_seed(0)))
    assert abs(itself) < 1e-3 * max(floor, 1.0)
    assert noised > 2 * floor and shuffled > 1.5 * floor


def test_shuffle_frames_permutes_time_only():
    video, _ = clips(3)
    shuffled = shuffle_frames(video, torch.Generator().manual_seed(1))
    for i in range(3):
        frames = {video[i, :, t].numpy().tobytes() for t in range(4)}
        assert {shuffled[i, :, t].numpy().tobytes() for t in range(4)} == frames


def test_temporal_consistency_is_low_on_real_clips_and_high_on_flicker():
    video, _ = clips(32, max_objects=1)
    steady = temporal_consistency(video)
    flicker = video.clone()
    flicker[:, :, ::2] = -1  # objects vanish every other frame
    assert steady["size_cv"] < 0.1 and steady["colour_drift"] < 0.05
    assert temporal_consistency(flicker)["size_cv"] > 0.5


def test_path_jitter_is_small_for_constant_velocity_and_large_for_jumping_objects():
    video = stacked(ShapesDataset(64, start=10**7, frames=8, size=32, max_objects=1, speed=0.09))["videos"]
    jumping = shuffle_frames(video, torch.Generator().manual_seed(0))
    assert temporal_consistency(video)["path_jitter"] < 0.5  # bounces only
    assert temporal_consistency(jumping)["path_jitter"] > 3.0


def test_clip_score_runs_with_weights_from_a_file(tmp_path):
    import open_clip

    from lightning_tmd.metrics.clip_score import CLIPVideoScore

    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    config = {"embed_dim": 16, "vision_cfg": vision,
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    model = open_clip.create_model("tiny-clip")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    scorer = CLIPVideoScore("tiny-clip", str(tmp_path / "tiny.pt"))
    video, _ = clips(3)
    scores = scorer(video, ["a red circle", "a blue square", "a green triangle"])
    assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()
    with pytest.raises(FileNotFoundError, match="clip_score.weights"):
        CLIPVideoScore("tiny-clip", None)


def test_lpips_diversity_with_backbone_weights_from_a_file(tmp_path):
    import torchvision

    from lightning_tmd.metrics.lpips_diversity import LPIPSDiversity

    features = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
    torch.save(features, tmp_path / "alexnet.pth")
    diversity = LPIPSDiversity(str(tmp_path / "alexnet.pth"))
    video, _ = clips(4)
    same = diversity(torch.stack([video[0], video[0]]), ["a", "a"])
    different = diversity(video, ["a", "a", "b", "b"])
    assert same == pytest.approx(0.0, abs=1e-6) and different > 0
    with pytest.raises(FileNotFoundError, match="lpips.weights"):
        LPIPSDiversity(None)


def test_outline_judge_reads_shapes_where_every_object_has_one_area(tiny_judge, tiny_outline_judge):
    """At one common area size says nothing about shape: the outline judge still reads shapes well above chance
    (1/3); each judge records its variant and refuses to stand in for the other."""
    path, net, _ = tiny_outline_judge
    batch = stacked(ShapesDataset(300, start=1 << 41, frames=4, size=16, max_objects=1, object_areas=(0.8, 0.8)))
    confusion = shape_confusion(net, batch["videos"], batch["labels"])
    assert confusion.sum() == 300 and confusion.shape == (3, 3)
    assert confusion.diag().sum() / 300 > 0.5
    saved = torch.load(path, weights_only=True)
    assert saved["training"]["variant"] == "outline" and "shape" in saved["accuracy_random_areas"]
    with pytest.raises(ValueError, match="variant"):
        load_judge(path, training={"variant": "original"})
    load_judge(tiny_judge[0], training={"variant": "original", "steps": 1500})
    with pytest.raises(ValueError, match="steps"):
        load_judge(tiny_judge[0], training={"variant": "original", "steps": 5000})
    assert judge_file_name({"frames": 8, "size": 32, "max_objects": 2, "speed": 0.09}, "outline") == (
        "judge_8x32_o2_v0.09_outline.pt")
    with pytest.raises(ValueError, match="judge.variant"):
        judge_file_name({"frames": 8, "size": 32, "max_objects": 2, "speed": 0.09}, "sizes")
