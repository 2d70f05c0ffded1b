"""Procedural captioned clips ("shapes"): 1-2 coloured objects moving at constant velocity.

Each clip is a pure function of (seed, index): objects of 6 colours x 3 shapes move in one of
8 directions on a plain black background, bouncing off the walls. Start positions are drawn where
the object does not reach a wall within the clip when such room exists, so the captioned
direction is the direction seen in every frame.

Item: {"video": (C, T, H, W) float32 in [-1, 1], "caption": str, "labels": {...} int64}.
Labels hold every caption attribute: `num_objects`, and per object slot `color`, `shape`,
`direction` (shape (max_objects,), -1 for an absent object).

By default every object has the same radius, so a shape's area gives it away (at 32 x 32: circles cover
about 72 pixels, squares 67, triangles 41). With `object_areas` each object's area is drawn at random and
its radius follows from its shape, so only the outline tells the shapes apart.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.85, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "cyan": (0.1, 0.9, 0.95),
    "magenta": (0.95, 0.15, 0.9),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) in image coordinates (y grows downwards)
    "up": (0, -1),
    "down": (0, 1),
    "left": (-1, 0),
    "right": (1, 0),
    "up and left": (-1, -1),
    "up and right": (1, -1),
    "down and left": (-1, 1),
    "down and right": (1, 1),
}
COLOR_NAMES = tuple(COLORS)
DIRECTION_NAMES = tuple(DIRECTIONS)
ATTRIBUTES = {"color": COLOR_NAMES, "shape": SHAPES, "direction": DIRECTION_NAMES}
BACKGROUND = -1.0
DEFAULT_SPEED = 0.06  # pixels per frame as a fraction of the clip size


def caption_of(objects: list[dict[str, int]]) -> str:
    """"a red circle moving up and left"; two objects are joined with "and"."""
    parts = [
        f"a {COLOR_NAMES[o['color']]} {SHAPES[o['shape']]} moving {DIRECTION_NAMES[o['direction']]}"
        for o in objects
    ]
    return " and ".join(parts)


# area of each shape in units of radius^2 (as `shape_mask` draws them)
AREA_PER_RADIUS2: dict[str, float] = {"circle": float(np.pi), "square": 1.7**2, "triangle": 0.5 * 2 * 1.8}


def radius_for_area(shape: str, area: float) -> float:
    """The radius at which `shape_mask` draws `shape` with the given area (pixels^2)."""
    return float(np.sqrt(area / AREA_PER_RADIUS2[shape]))


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Pixels inside a shape centred at the origin; dx, dy are pixel-centre offsets."""
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        half = 0.85 * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex up, base down
        top, bottom = -radius, 0.8 * radius
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) / (bottom - top) * radius)
    raise ValueError(f"unknown shape {shape!r}")


def bounce(p0: np.ndarray, velocity: np.ndarray, steps: np.ndarray, low: float, high: float) -> np.ndarray:
    """Positions p0 + v*t reflected between the walls [low, high] (elastic bounces)."""
    span = high - low
    raw = p0[None] - low + steps[:, None] * velocity[None]
    folded = np.mod(raw, 2 * span)
    return low + np.where(folded > span, 2 * span - folded, folded)


class ShapesDataset(Dataset):
    """`length` clips with global indices start .. start + length - 1 under `seed`."""

    def __init__(self, length: int, start: int = 0, seed: int = 0, frames: int = 8, size: int = 32,
                 max_objects: int = 2, radius: float = 0.15, speed: float = DEFAULT_SPEED,
                 two_object_fraction: float | None = None,
                 object_areas: tuple[float, float] | None = None) -> None:
        if max_objects not in (1, 2):
            raise ValueError(f"data.max_objects must be 1 or 2, got {max_objects}")
        if two_object_fraction is not None and (max_objects != 2 or not 0 <= two_object_fraction <= 1):
            raise ValueError(f"data.train_two_object_fraction={two_object_fraction}: give a share in [0, 1] with "
                             f"data.max_objects=2 (got {max_objects}), or null for equal odds")
        if speed <= 0:
            raise ValueError(f"data.speed={speed}: objects must move; give a positive fraction of the clip "
                             f"size per frame ({DEFAULT_SPEED} by default)")
        if object_areas is not None and not 0 < object_areas[0] <= object_areas[1]:
            raise ValueError(f"object_areas={list(object_areas)}: give [low, high] with 0 < low <= high, in units "
                             "of the default circle's area, or null for one radius for every shape")
        self.length, self.start, self.seed = length, start, seed
        self.object_areas = None if object_areas is None else (float(object_areas[0]), float(object_areas[1]))
        self.frames, self.size, self.max_objects = frames, size, max_objects
        self.two_object_fraction = two_object_fraction
        self.radius = radius * size  # pixels
        self.speed = speed * size  # pixels per frame
        centres = np.arange(size) + 0.5
        self._xs, self._ys = np.meshgrid(centres, centres)  # (H, W)

    def __len__(self) -> int:
        return self.length

    def sample_count(self, rng: np.random.Generator) -> int:
        if self.max_objects == 1:
            return 1
        if self.two_object_fraction is None:  # equal odds: the clips of every judge and held-out prompt set
            return int(rng.integers(1, 3))
        return 2 if rng.random() < self.two_object_fraction else 1

    def sample_objects(self, rng: np.random.Generator) -> list[dict[str, int]]:
        count = self.sample_count(rng)
        colors = rng.choice(len(COLORS), size=count, replace=False)
        objects = [
            {"color": int(c), "shape": int(rng.integers(len(SHAPES))),
             "direction": int(rng.integers(len(DIRECTIONS)))}
            for c in colors
        ]
        if self.object_areas is not None:  # drawn after the attributes: captions stay those of the default data
            circle = AREA_PER_RADIUS2["circle"] * self.radius**2
            for obj, area in zip(objects, rng.uniform(*self.object_areas, size=count)):
                obj["radius"] = radius_for_area(SHAPES[obj["shape"]], area * circle)
        return objects

    def object_radius(self, obj: dict) -> float:
        return obj.get("radius", self.radius)

    def trajectory(self, rng: np.random.Generator, direction: int, radius: float | None = None) -> np.ndarray:
        """(T, 2) object centres: constant velocity, bouncing off the walls."""
        unit = np.asarray(DIRECTIONS[DIRECTION_NAMES[direction]], dtype=np.float64)
        velocity = self.speed * unit / np.linalg.norm(unit)
        radius = self.radius if radius is None else radius
        low, high = radius, self.size - radius
        travel = velocity * (self.frames - 1)
        start = np.empty(2)
        for axis in range(2):  # prefer starts that reach no wall within the clip
            lo, hi = low - min(travel[axis], 0.0), high - max(travel[axis], 0.0)
            start[axis] = rng.uniform(lo, hi) if hi > lo else rng.uniform(low, high)
        return bounce(start, velocity, np.arange(self.frames, dtype=np.float64), low, high)

    def separated_paths(self, rng: np.random.Generator, objects: list[dict[str, int]],
                        tries: int = 32) -> list[np.ndarray]:
        """Trajectories; a second object's start is redrawn (up to `tries` times) until the two
        never come closer than 0.9 times the sum of their radii, so both stay visible in every frame."""
        first = objects[0]
        paths = [self.trajectory(rng, first["direction"], self.object_radius(first))]
        for obj in objects[1:]:
            gap = 0.9 * (self.object_radius(first) + self.object_radius(obj))
            for _ in range(tries):
                path = self.trajectory(rng, obj["direction"], self.object_radius(obj))
                if np.linalg.norm(path - paths[0], axis=1).min() >= gap:
                    break
            paths.append(path)
        return paths

    def render(self, objects: list[dict[str, int]], paths: list[np.ndarray]) -> np.ndarray:
        video = np.full((3, self.frames, self.size, self.size), BACKGROUND, dtype=np.float32)
        for obj, path in zip(objects, paths):
            colour = np.asarray(COLORS[COLOR_NAMES[obj["color"]]], dtype=np.float32) * 2 - 1
            for f, (cx, cy) in enumerate(path):
                mask = shape_mask(SHAPES[obj["shape"]], self._xs - cx, self._ys - cy, self.object_radius(obj))
                video[:, f, mask] = colour[:, None]
        return video

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.start + index])
        objects = self.sample_objects(rng)
        paths = self.separated_paths(rng, objects)
        labels = {"num_objects": torch.tensor(len(objects))}
        for key in ATTRIBUTES:
            values = [o[key] for o in objects] + [-1] * (self.max_objects - len(objects))
            labels[key] = torch.tensor(values)
        return {
            "video": torch.from_numpy(self.render(objects, paths)),
            "caption": caption_of(objects),
            "labels": labels,
        }


def clip_key(data: dict) -> dict:
    """What the clips of a data config look like: frames, size, max_objects, speed (configs written
    before `speed` was a setting used the default speed), and `object_areas` when set. Checkpoints and
    evaluations are tied to it."""
    key = {"frames": data["frames"], "size": data["size"], "max_objects": data["max_objects"],
           "speed": data.get("speed", DEFAULT_SPEED)}
    if data.get("object_areas") is not None:
        key["object_areas"] = [float(a) for a in data["object_areas"]]
    return key


def clip_settings(data: dict) -> dict:
    """The settings that define the clips of a data config: `clip_key` and the seed."""
    return {**clip_key(data), "seed": data["seed"]}


def stacked(dataset: ShapesDataset) -> dict:
    """Every clip of `dataset` in one batch: videos (N, C, T, H, W), captions, labels {name: (N, ...)}."""
    items = [dataset[i] for i in range(len(dataset))]
    return {
        "videos": torch.stack([it["video"] for it in items]),
        "captions": [it["caption"] for it in items],
        "labels": {k: torch.stack([it["labels"][k] for it in items]) for k in items[0]["labels"]},
    }
