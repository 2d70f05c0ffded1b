from pathlib import Path

import pytest
import torch

from lightning_tmd.data.datamodule import ShapesDataModule
from lightning_tmd.data.shapes import COLOR_NAMES, DIRECTION_NAMES, DIRECTIONS, SHAPES, ShapesDataset
from lightning_tmd.nets.text import VocabTextEncoder


def test_clips_are_deterministic_in_seed_and_index():
    a, b = ShapesDataset(10, seed=3), ShapesDataset(10, seed=3)
    for i in range(10):
        assert torch.equal(a[i]["video"], b[i]["video"]) and a[i]["caption"] == b[i]["caption"]
    assert not torch.equal(a[0]["video"], ShapesDataset(10, seed=4)[0]["video"])


def test_clip_shape_range_and_vocabulary():
    data = ShapesDataset(200, frames=6, size=24)
    counts = set()
    for i in range(200):
        item = data[i]
        assert item["video"].shape == (3, 6, 24, 24)
        assert item["video"].min() >= -1 and item["video"].max() <= 1
        counts.add(int(item["labels"]["num_objects"]))
    assert counts == {1, 2}
    assert len(COLOR_NAMES) >= 6 and len(SHAPES) >= 3 and len(DIRECTIONS) >= 8


def test_caption_agrees_with_labels():
    data = ShapesDataset(100)
    for i in range(100):
        item = data[i]
        labels, parts = item["labels"], item["caption"].split(" and a ")
        assert len(parts) == int(labels["num_objects"])
        for k, part in enumerate(parts):
            words = part.removeprefix("a ").split(" moving ")
            colour, shape = words[0].split()
            assert COLOR_NAMES[labels["color"][k]] == colour
            assert SHAPES[labels["shape"][k]] == shape
            assert DIRECTION_NAMES[labels["direction"][k]] == words[1]
        if len(parts) == 1:
            assert labels["color"][1] == labels["shape"][1] == labels["direction"][1] == -1


def object_centre(video, colour_index, frame):
    """Mean pixel position of the object whose colour is COLOR_NAMES[colour_index]."""
    from lightning_tmd.data.shapes import COLORS

    rgb = torch.tensor(COLORS[COLOR_NAMES[colour_index]]) * 2 - 1
    mask = (video[:, frame] - rgb[:, None, None]).abs().sum(0) < 1e-4
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return xs.float().mean(), ys.float().mean()


def test_motion_follows_the_captioned_direction():
    data = ShapesDataset(50, max_objects=1)
    for i in range(50):
        item = data[i]
        colour, direction = int(item["labels"]["color"][0]), int(item["labels"]["direction"][0])
        (x0, y0), (x1, y1) = object_centre(item["video"], colour, 0), object_centre(item["video"], colour, -1)
        dx, dy = DIRECTIONS[DIRECTION_NAMES[direction]]
        for delta, want in ((x1 - x0, dx), (y1 - y0, dy)):
            if want:
                assert torch.sign(delta) == want
            else:
                assert abs(delta) < 1.0


@pytest.mark.parametrize("speed", [0.06, 0.09])
def test_speed_sets_the_displacement_per_frame(speed):
    data = ShapesDataset(20, max_objects=1, speed=speed)
    for i in range(20):
        item = data[i]
        colour = int(item["labels"]["color"][0])
        (x0, y0), (x1, y1) = object_centre(item["video"], colour, 0), object_centre(item["video"], colour, -1)
        travelled = float(torch.hypot(x1 - x0, y1 - y0))
        assert abs(travelled - speed * 32 * 7) < 1.5, (i, travelled)  # pixel quantisation of the centroid


def test_a_speed_that_is_not_positive_is_refused():
    for speed in (0.0, -0.05):
        with pytest.raises(ValueError, match="data.speed"):
            ShapesDataset(4, speed=speed)
    datamodule = ShapesDataModule(None, speed=0.09, num_train=4, num_val=4)
    assert datamodule.train_set.speed == datamodule.val_set.speed == 0.09 * 32


def test_two_object_share_of_training_clips():
    counts = {p: [int(ShapesDataset(200, frames=2, size=8, two_object_fraction=p)[i]["labels"]["num_objects"])
                  for i in range(200)] for p in (0.0, 0.75, 1.0)}
    assert set(counts[0.0]) == {1} and set(counts[1.0]) == {2}
    assert 0.65 < counts[0.75].count(2) / 200 < 0.85
    for bad in ({"two_object_fraction": 1.5}, {"two_object_fraction": 0.5, "max_objects": 1}):
        with pytest.raises(ValueError, match="data.train_two_object_fraction"):
            ShapesDataset(4, **bad)
    dm = ShapesDataModule(None, frames=2, size=8, num_train=4, num_val=4, train_two_object_fraction=1.0)
    reference = ShapesDataModule(None, frames=2, size=8, num_train=4, num_val=4)
    assert dm.train_set.two_object_fraction == 1.0 and dm.val_set.two_object_fraction is None
    assert all(torch.equal(dm.val_set[i]["video"], reference.val_set[i]["video"]) for i in range(4))


def test_train_and_val_never_overlap():
    dm = ShapesDataModule(VocabTextEncoder(16, 16), "", frames=4, size=16, num_train=300, num_val=100)
    train = {dm.train_set[i]["video"].numpy().tobytes() for i in range(300)}
    val = {dm.val_set[i]["video"].numpy().tobytes() for i in range(100)}
    assert not train & val
    assert dm.train_set.start + len(dm.train_set) <= dm.val_set.start


def test_batches_carry_cached_text_and_negative_prompt():
    dm = ShapesDataModule(VocabTextEncoder(16, 16), "", frames=4, size=16, batch_size=4)
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["video"].shape == (4, 3, 4, 16, 16)
    assert batch["context"].shape == (4, 16, 16) and batch["negative_context"].shape == (4, 16, 16)
    assert batch["negative_mask"].sum(1).tolist() == [1, 1, 1, 1]  # the empty caption: BOS only
    size = dm.prompts.cache_size
    dm.on_before_batch_transfer(batch, 0)
    assert dm.prompts.cache_size == size  # encoded once


def test_resumable_loader_starts_a_new_epoch_after_a_fully_served_one():
    """A prefetching trainer stops reading after the last batch without exhausting the iterator."""
    from lightning_tmd.data.datamodule import ResumableLoader

    exhausted, prefetched = ResumableLoader(list(range(12)), 4, seed=1), ResumableLoader(list(range(12)), 4, seed=1)
    for _ in range(3):
        iterator = iter(prefetched)
        served = [next(iterator).tolist() for _ in range(len(prefetched))]
        assert served == [b.tolist() for b in exhausted]
    assert len(prefetched) == 3 and prefetched.epoch == 2


def object_area(video, colour_index):
    """Mean pixel area over frames of the object whose colour is COLOR_NAMES[colour_index]."""
    from lightning_tmd.data.shapes import COLORS

    rgb = torch.tensor(COLORS[COLOR_NAMES[colour_index]]) * 2 - 1
    return ((video - rgb[:, None, None, None]).abs().sum(0) < 1e-4).float().sum((1, 2)).mean().item()


def test_random_object_areas_keep_captions_and_make_area_uninformative():
    default, jittered = ShapesDataset(300, max_objects=1), ShapesDataset(300, max_objects=1, object_areas=(0.4, 1.3))
    areas = {shape: [] for shape in SHAPES}
    for i in range(300):
        a, b = default[i], jittered[i]
        assert a["caption"] == b["caption"]  # the areas are drawn after the caption's attributes
        assert all(torch.equal(a["labels"][k], b["labels"][k]) for k in a["labels"])
        areas[SHAPES[int(b["labels"]["shape"][0])]].append(object_area(b["video"], int(b["labels"]["color"][0])))
    circle = 3.14159 * (0.15 * 32) ** 2
    means = {shape: sum(v) / len(v) / circle for shape, v in areas.items()}
    assert all(0.75 < m < 0.95 for m in means.values()), means  # E U(0.4, 1.3) = 0.85 for every shape
    assert all(min(v) < 0.5 * circle and max(v) > 1.2 * circle for v in areas.values())
    # one common area: every shape covers the same number of pixels (up to pixel quantisation)
    same = ShapesDataset(60, max_objects=1, object_areas=(0.7, 0.7))
    sizes = [object_area(same[i]["video"], int(same[i]["labels"]["color"][0])) / (0.7 * circle) for i in range(60)]
    assert all(0.85 < s < 1.15 for s in sizes) and 0.97 < sum(sizes) / len(sizes) < 1.03, sizes
    two = ShapesDataset(50, two_object_fraction=1.0, object_areas=(0.4, 1.3))
    for i in range(50):  # both objects stay visible and apart
        item = two[i]
        assert all(object_area(item["video"], int(c)) > 0.2 * circle for c in item["labels"]["color"])
    with pytest.raises(ValueError, match="object_areas"):
        ShapesDataset(4, object_areas=(1.0, 0.5))


def test_the_run_seed_orders_the_training_clips_but_keeps_the_clips():
    """`seed=1` must change what a run sees first (else a second seed of KD repeats the first exactly);
    the clips, the validation set and the held-out prompts stay functions of `data.seed`."""
    from conftest import compose_train

    for experiment in ("shapes_smoke", "shapes_kd"):
        for seed in (0, 1):
            cfg = compose_train([f"experiment={experiment}", f"seed={seed}"], Path("unused"))
            assert cfg.data.shuffle_seed == seed and cfg.data.seed == 0
    first = [ShapesDataModule(None, frames=2, size=8, num_train=64, num_val=4, shuffle_seed=s) for s in (0, 1)]
    batches = [next(iter(dm.train_dataloader()))["caption"] for dm in first]
    assert batches[0] != batches[1]
    assert all(torch.equal(first[0].train_set[i]["video"], first[1].train_set[i]["video"]) for i in range(4))
    assert all(torch.equal(first[0].val_set[i]["video"], first[1].val_set[i]["video"]) for i in range(4))
