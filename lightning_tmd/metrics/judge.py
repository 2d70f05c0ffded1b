"""The shapes judge: a small 3D-conv video network trained on shapes clips to read every caption
attribute back from pixels.

Colours within a clip are distinct, so the judge predicts per colour: is an object of this colour
present, and if so its shape and direction; plus the object count. Its penultimate features
(`num_features` wide) feed the Fréchet video distance (FVD-shapes).

Two variants differ in the clips they are trained on (`JUDGE_VARIANTS`). In the default shapes data one
radius serves every shape, so an object's area gives its shape away and a judge trained on those clips
alone (`original`) may read shape from size. The `outline` judge trains on clips whose objects have random
areas (`ShapesDataset(object_areas=...)`), so only the outline tells the shapes apart.

A trained judge is cached under a file name that holds every setting it depends on (`judge_file_name`):
the clip settings, the variant, the training settings and `JUDGE_VERSION`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tmd.data.shapes import COLOR_NAMES, DEFAULT_SPEED, DIRECTION_NAMES, SHAPES

NUM_COLORS, NUM_SHAPES, NUM_DIRECTIONS = len(COLOR_NAMES), len(SHAPES), len(DIRECTION_NAMES)
# judge variant -> the object areas of its training clips (units of the default circle's area; None: the
# default clips, where circles, squares and triangles cover 1.0, 0.92 and 0.57 of it)
JUDGE_VARIANTS: dict[str, tuple[float, float] | None] = {"original": None, "outline": (0.4, 1.3)}
# measured: 5 000 steps of batch 32 on 8 x 32 x 32 clips take about 9.5 minutes on 2 CPU cores
JUDGE_MINUTES_PER_STEP_PIXEL = 9.5 / (5000 * 32 * 8 * 32 * 32)
# of the judge's network, loss and training clips: bump it when one changes, so that cached judges are retrained
JUDGE_VERSION = 1
# the training settings of the judges cached before file names held them: a file name leaves these out
UNNAMED_TRAINING = {"steps": 5000, "batch_size": 32, "seed": 0, "width": 32, "num_features": 128, "version": 1}
NAME_TAGS = {"steps": "s", "batch_size": "b", "seed": "seed", "width": "w", "num_features": "f", "version": "r"}

log = logging.getLogger(__name__)


def conv_block(c_in: int, c_out: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class ShapesJudgeNet(nn.Module):
    """(B, 3, T, H, W) in [-1, 1] -> attribute logits; `features()` gives the penultimate layer."""

    def __init__(self, width: int = 32, num_features: int = 128, max_objects: int = 2) -> None:
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            conv_block(3, width, (1, 2, 2)),
            conv_block(width, 2 * width, (2, 2, 2)),
            conv_block(2 * width, 4 * width, (1, 2, 2)),
            conv_block(4 * width, 4 * width, (1, 1, 1)),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(4 * width, num_features),
            nn.SiLU(),
        )
        self.count = nn.Linear(num_features, max_objects)  # 1 .. max_objects objects
        self.present = nn.Linear(num_features, NUM_COLORS)
        self.shape = nn.Linear(num_features, NUM_COLORS * NUM_SHAPES)
        self.direction = nn.Linear(num_features, NUM_COLORS * NUM_DIRECTIONS)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        return self.body(video.float())

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(video)
        return {
            "count": self.count(h),
            "present": self.present(h),
            "shape": self.shape(h).unflatten(1, (NUM_COLORS, NUM_SHAPES)),
            "direction": self.direction(h).unflatten(1, (NUM_COLORS, NUM_DIRECTIONS)),
        }


class JudgeFeatures(nn.Module):
    """The judge's penultimate features as a torchmetrics feature extractor (has `num_features`)."""

    def __init__(self, judge: ShapesJudgeNet) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.judge.features(video)


def per_color_targets(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Object-slot labels -> per-colour targets: present (B, 6) and shape / direction (B, 6), -1 if absent."""
    color = labels["color"]
    batch = color.shape[0]
    present = torch.zeros(batch, NUM_COLORS, device=color.device)
    shape = torch.full((batch, NUM_COLORS), -1, dtype=torch.long, device=color.device)
    direction = shape.clone()
    rows, slots = torch.nonzero(color >= 0, as_tuple=True)
    cols = color[rows, slots]
    present[rows, cols] = 1.0
    shape[rows, cols] = labels["shape"][rows, slots]
    direction[rows, cols] = labels["direction"][rows, slots]
    return {"present": present, "shape": shape, "direction": direction}


def judge_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    target = per_color_targets(labels)
    return (
        F.cross_entropy(logits["count"], labels["num_objects"] - 1)
        + F.binary_cross_entropy_with_logits(logits["present"], target["present"])
        + F.cross_entropy(logits["shape"].flatten(0, 1), target["shape"].flatten(), ignore_index=-1)
        + F.cross_entropy(logits["direction"].flatten(0, 1), target["direction"].flatten(), ignore_index=-1)
    )


@dataclass
class Judgement:
    """Per-clip verdicts of the judge against the prompt's labels (bool tensors, shape (B,))."""

    count: torch.Tensor
    color: torch.Tensor  # the set of colours is exactly the captioned one
    shape: torch.Tensor  # every captioned object (by colour) has the captioned shape
    direction: torch.Tensor  # ... and the captioned direction
    objects: dict[str, torch.Tensor]  # per captioned object: (N_objects,) bool for each attribute
    shapes: torch.Tensor  # per captioned object: (N_objects, 2) captioned and read shape index
    same: dict[str, torch.Tensor]  # shape / direction: (B,) 1 when both objects read alike, NaN if not applicable

    @property
    def all(self) -> torch.Tensor:
        return self.count & self.color & self.shape & self.direction


@torch.no_grad()
def judge(net: ShapesJudgeNet, video: torch.Tensor, labels: dict[str, torch.Tensor]) -> Judgement:
    """Compare what the judge reads from `video` with the prompt's `labels`."""
    logits = net(video)
    target = per_color_targets(labels)
    count = logits["count"].argmax(1) + 1
    # the `count` most likely colours are the ones present
    ranked = logits["present"].argsort(1, descending=True)
    ranks = torch.empty_like(ranked)
    ranks.scatter_(1, ranked, torch.arange(NUM_COLORS, device=ranked.device).expand_as(ranked))
    predicted_present = ranks < count[:, None]
    captioned = target["present"].bool()
    shape, direction = logits["shape"].argmax(2), logits["direction"].argmax(2)
    shape_ok, direction_ok = shape == target["shape"], direction == target["direction"]
    return Judgement(
        count=count == labels["num_objects"],
        color=(predicted_present == captioned).all(1),
        shape=(shape_ok | ~captioned).all(1),
        direction=(direction_ok | ~captioned).all(1),
        objects={
            "color": predicted_present[captioned],
            "shape": shape_ok[captioned],
            "direction": direction_ok[captioned],
        },
        shapes=torch.stack([target["shape"][captioned], shape[captioned]], dim=1),
        same={"shape": read_alike(shape, target["shape"], captioned),
              "direction": read_alike(direction, target["direction"], captioned)},
    )


def read_alike(read: torch.Tensor, target: torch.Tensor, captioned: torch.Tensor) -> torch.Tensor:
    """Attribute leakage: per clip whose caption gives its two objects different values of an attribute,
    1.0 when the judge reads the same value for both (one object's words bound to both), else 0.0; NaN for
    the other clips. `read` and `target` are per colour (B, 6), `captioned` marks the captioned colours."""
    pair = captioned.int().argsort(dim=1, descending=True, stable=True)[:, :2]  # the two captioned colours
    read, target = read.gather(1, pair), target.gather(1, pair)
    applies = (captioned.sum(1) == 2) & (target[:, 0] != target[:, 1])
    alike = (read[:, 0] == read[:, 1]).float()
    return torch.where(applies, alike, torch.full_like(alike, float("nan")))


class JudgeModule(L.LightningModule):
    """Trains the judge on shapes clips (the DataModule's text is not used)."""

    def __init__(self, width: int = 32, num_features: int = 128, max_objects: int = 2, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = ShapesJudgeNet(width, num_features, max_objects)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = judge_loss(self.net(batch["video"]), batch["labels"])
        self.log("judge/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        verdict = judge(self.net, batch["video"], batch["labels"])
        for key in ("count", "color", "shape", "direction", "all"):
            self.log(f"judge_val/{key}", getattr(verdict, key).float().mean(), batch_size=len(batch["video"]))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        steps = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1000
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.hparams.lr, total_steps=steps, pct_start=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def save_judge(net: ShapesJudgeNet, path: str | Path, data: dict, accuracy: dict[str, float],
               training: dict[str, Any] | None = None, **extra: Any) -> Path:
    """Cache the judge with the clip settings and training settings it was made with and its held-out
    accuracy (`extra`: further entries, e.g. the accuracy on clips of random object areas)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "config": {"width": net.body[0][0].out_channels,
                "num_features": net.num_features, "max_objects": net.count.out_features},
                "data": data, "training": training or {}, "accuracy": accuracy, **extra}, path)
    return path


def load_judge(path: str | Path, data: dict | None = None,
               training: dict[str, Any] | None = None) -> tuple[ShapesJudgeNet, dict]:
    """Load a cached judge; with `data` (clip settings) and `training` (variant, steps, batch size),
    check it was made with the same ones. Judges cached before the variants existed are `original`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge.path: no cached judge at '{path}': `python -m lightning_tmd.evaluate` "
                                "trains one there when it is missing (or call `train_judge`)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if data is not None:
        cached = {"speed": DEFAULT_SPEED, **saved["data"]}  # judges cached before `speed` was a setting
        mismatched = {k: (cached.get(k), v) for k, v in data.items() if cached.get(k) != v}
        if mismatched:
            raise ValueError(f"judge.path: '{path}' was trained on other clips {mismatched} (cached, wanted): "
                             "retrain it for these data settings")
    if training is not None:
        cached = {"variant": "original", "seed": 0, "version": 1, **saved["config"], **saved.get("training", {})}
        mismatched = {k: (cached[k], v) for k, v in training.items() if k in cached and cached[k] != v}
        if mismatched:
            raise ValueError(f"judge: '{path}' was trained with other settings {mismatched} (cached, wanted): set "
                             "judge.path to another file (or delete this one) to train a judge with these")
    net = ShapesJudgeNet(**saved["config"])
    net.load_state_dict(saved["state_dict"])
    return net.eval().requires_grad_(False), saved


def data_key(frames: int, size: int, max_objects: int, speed: float = DEFAULT_SPEED) -> dict[str, float]:
    """The clip settings a judge is tied to."""
    return {"frames": frames, "size": size, "max_objects": max_objects, "speed": speed}


def training_key(variant: str = "original", steps: int = 5000, batch_size: int = 32, seed: int = 0,
                 width: int = 32, num_features: int = 128) -> dict[str, Any]:
    """Every setting besides the clips that changes a trained judge, and the version of its recipe."""
    return {"variant": check_variant(variant), "steps": steps, "batch_size": batch_size, "seed": seed,
            "width": width, "num_features": num_features, "version": JUDGE_VERSION}


def judge_file_name(data: dict, variant: str = "original", training: dict[str, int] | None = None) -> str:
    """judge_<frames>x<size>_o<max_objects>.pt, with _v<speed> when the speed is not the default, _<variant>
    for a variant other than `original`, and a tag for each setting of `training` (steps, batch_size, seed,
    width, num_features) and of `JUDGE_VERSION` that differs from `UNNAMED_TRAINING` (e.g. _s1000, _seed1, _r2)."""
    settings = training_key(variant, **(training or {}))
    speed = "" if data["speed"] == DEFAULT_SPEED else f"_v{data['speed']:g}"
    suffix = "" if variant == "original" else f"_{variant}"
    tags = "".join(f"_{tag}{settings[k]}" for k, tag in NAME_TAGS.items() if settings[k] != UNNAMED_TRAINING[k])
    return f"judge_{data['frames']}x{data['size']}_o{data['max_objects']}{speed}{suffix}{tags}.pt"


def check_variant(variant: str) -> str:
    if variant not in JUDGE_VARIANTS:
        raise ValueError(f"judge.variant='{variant}' is unknown: use one of {tuple(JUDGE_VARIANTS)} (outline: "
                         "trained on clips of random object areas; original: on the default clips)")
    return variant


@torch.no_grad()
def judge_accuracy(net: ShapesJudgeNet, videos: torch.Tensor, labels: dict[str, torch.Tensor],
                   batch_size: int = 64) -> dict[str, float]:
    """Per-attribute accuracy: count and all-correct per clip; colour, shape, direction per object. Then,
    per number k of captioned objects, all-correct of those clips (`all_<k>obj`) and the direction of
    their objects (`direction_<k>obj`): two-object prompts are much harder than one-object ones. And the
    attribute leakage of two-object prompts (`same_shape_2obj`, `same_direction_2obj`): of the clips whose
    caption gives the objects different shapes (directions), the share where both are read alike."""
    verdicts = [judge(net, videos[i : i + batch_size], {k: v[i : i + batch_size] for k, v in labels.items()})
                for i in range(0, len(videos), batch_size)]
    objects = {k: torch.cat([v.objects[k] for v in verdicts]) for k in ("color", "shape", "direction")}
    every = torch.cat([v.all for v in verdicts])
    count = labels["num_objects"].cpu()
    # objects are listed clip by clip, one per captioned (distinct) colour: the object count of each one's clip
    object_count = count.repeat_interleave(count)
    by_count = {}
    for k in count.unique().tolist():
        by_count[f"all_{k}obj"] = every[count == k].float().mean().item()
        by_count[f"direction_{k}obj"] = objects["direction"][object_count == k].float().mean().item()
    for name in ("shape", "direction"):
        same = torch.cat([v.same[name] for v in verdicts])
        if not same.isnan().all():
            by_count[f"same_{name}_2obj"] = same.nanmean().item()
    return {
        "count": torch.cat([v.count for v in verdicts]).float().mean().item(),
        **{k: v.float().mean().item() for k, v in objects.items()},
        "all": every.float().mean().item(),
        **by_count,
    }


@torch.no_grad()
def shape_confusion(net: ShapesJudgeNet, videos: torch.Tensor, labels: dict[str, torch.Tensor],
                    batch_size: int = 64) -> torch.Tensor:
    """(3, 3) counts over captioned objects: row = captioned shape, column = the shape the judge reads."""
    pairs = torch.cat([judge(net, videos[i : i + batch_size], {k: v[i : i + batch_size] for k, v in labels.items()})
                       .shapes for i in range(0, len(videos), batch_size)])
    return torch.bincount(pairs[:, 0] * NUM_SHAPES + pairs[:, 1], minlength=NUM_SHAPES**2).view(NUM_SHAPES, NUM_SHAPES)


def train_judge(path: str | Path, frames: int = 8, size: int = 32, max_objects: int = 2,
                speed: float = DEFAULT_SPEED, steps: int = 5000, batch_size: int = 32, num_val: int = 1024,
                seed: int = 0, width: int = 32, num_features: int = 128,
                variant: str = "original") -> tuple[ShapesJudgeNet, dict[str, float]]:
    """Train a judge of `variant` on the shapes train split, measure it on held-out val clips (the default
    clips, and clips of random object areas), cache it at `path`."""
    from lightning_tmd.data.datamodule import ShapesDataModule
    from lightning_tmd.data.shapes import ShapesDataset, stacked

    areas = JUDGE_VARIANTS[check_variant(variant)]
    L.seed_everything(seed)
    datamodule = ShapesDataModule(None, frames=frames, size=size, max_objects=max_objects, speed=speed,
                                  batch_size=batch_size, num_val=256, seed=seed, object_areas=areas)
    module = JudgeModule(width, num_features, max_objects)
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        val_check_interval=min(500, steps), check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=datamodule)
    # held out: validation clips the judge never saw, past the ones used for the validation curve; the
    # default clips, and the same prompts with random object areas (where size says nothing of shape)
    net = module.net.eval().requires_grad_(False)
    accuracy = {}
    for name, object_areas in (("accuracy", None), ("accuracy_random_areas", JUDGE_VARIANTS["outline"])):
        held_out = stacked(ShapesDataset(num_val, start=datamodule.val_set.start + 10_000, seed=seed, frames=frames,
                                         size=size, max_objects=max_objects, speed=speed, object_areas=object_areas))
        accuracy[name] = judge_accuracy(net, held_out["videos"], held_out["labels"])
    training = training_key(variant, steps, batch_size, seed, width, num_features)
    save_judge(net, path, data_key(frames, size, max_objects, speed), accuracy["accuracy"], training,
               accuracy_random_areas=accuracy["accuracy_random_areas"])
    return net, accuracy["accuracy"]


def ensure_judge(path: str | Path, frames: int, size: int, max_objects: int, speed: float = DEFAULT_SPEED,
                 variant: str = "original", steps: int = 5000, batch_size: int = 32,
                 **train_kwargs: Any) -> tuple[ShapesJudgeNet, dict]:
    """The cached judge for these clip and training settings, trained first if there is none; a judge at
    `path` trained with other settings is refused (`judge_file_name` gives each its own file)."""
    key = data_key(frames, size, max_objects, speed)
    named = {k: train_kwargs[k] for k in ("seed", "width", "num_features") if k in train_kwargs}
    training = training_key(variant, steps, batch_size, **named)
    if not Path(path).is_file():
        minutes = JUDGE_MINUTES_PER_STEP_PIXEL * steps * batch_size * frames * size * size
        expected = f"~{minutes:.0f} min" if minutes >= 1 else "under a minute"
        log.info("Training the shapes judge first (%s, %d steps of batch %d on %d x %d x %d clips; expected time %s "
                 "on 2 CPU cores). It is trained once and cached at %s", variant, steps, batch_size, frames, size,
                 size, expected, path)
        train_judge(path, frames, size, max_objects, speed, steps=steps, batch_size=batch_size, variant=variant,
                    **train_kwargs)
    return load_judge(path, key, training)
