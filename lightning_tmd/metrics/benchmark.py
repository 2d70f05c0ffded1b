"""The shapes benchmark, apart from its app (`lightning_tmd.evaluate`): the held-out set, generated sets cached
under the checkpoint's content hash, the quality of a set (FVD-shapes, the judge's accuracies, temporal
consistency), sampling latency, and the results table."""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lightning_tmd.data.datamodule import VAL_START
from lightning_tmd.data.shapes import ShapesDataset, clip_settings, stacked
from lightning_tmd.generators import LoadedGenerator
from lightning_tmd.metrics.judge import ShapesJudgeNet, judge_accuracy, shape_confusion
from lightning_tmd.metrics.video import fake_distance, temporal_consistency
from lightning_tmd.sampling import sample_clips, seeded_noise
from lightning_tmd.video import to_uint8

COLUMNS = [("model", "model"), ("setting", "setting"), ("nfe", "eff. NFE"), ("fvd", "FVD-shapes ↓"),
           ("adherence", "adherence ↑"), ("count", "count"), ("color", "colour"), ("shape", "shape"),
           ("direction", "direction"), ("all_1obj", "adherence 1 obj"), ("direction_1obj", "direction 1 obj"),
           ("all_2obj", "adherence 2 obj"), ("direction_2obj", "direction 2 obj"),
           ("same_shape_2obj", "same shape 2 obj ↓"), ("same_direction_2obj", "same dir. 2 obj ↓"),
           ("size_cv", "size CV ↓"), ("colour_drift", "colour drift ↓"),
           ("path_jitter", "path jitter px ↓"),
           ("clip_score", "CLIP score"), ("lpips_diversity", "LPIPS div."),
           ("latency_s", "s / clip"), ("clips_per_s", "clips / s")]


def held_out_set(data: dict[str, int], count: int, offset: int) -> dict[str, Any]:
    """`count` validation clips from `offset` on: videos, captions, labels (never seen in training)."""
    return stacked(ShapesDataset(count, start=VAL_START + offset, **clip_settings(data)))


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_digest(path: Path) -> str:
    """SHA-256 of the checkpoint file's bytes (hashed once per file version), so cached sets follow the weights
    and not the folder they sit in."""
    stat = path.stat()
    return _file_digest(path.resolve(), stat.st_mtime_ns, stat.st_size)


def generate_set(loaded: LoadedGenerator, captions: list[str], seeds: list[int], sampler: dict, batch_size: int,
                 cache_dir: Path) -> tuple[torch.Tensor, float]:
    """Generated clips (as the uint8 video they are written as, back in [-1, 1]) and NFE; cached on disk."""
    weights = [] if loaded.ema else ["raw weights"]
    key = cache_key(checkpoint_digest(loaded.path), captions, seeds, sampler, *weights)
    path = cache_dir / "samples" / f"{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        frames, nfe = saved["videos"], saved["nfe"]
    else:
        clips, nfe = sample_clips(loaded.module, loaded.prompts, captions, seeds, loaded.clip_shape,
                                  batch_size=batch_size, progress=True, **sampler)
        frames = to_uint8(clips)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"videos": frames, "nfe": nfe, "sampler": sampler, "ckpt": str(loaded.path)}, path)
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1, nfe


def time_sampling(loaded: LoadedGenerator, sampler: dict, batch_size: int, repeats: int,
                  caption: str = "a red circle moving up") -> dict[str, float]:
    """Median wall time of generating `batch_size` clips (one warm-up run first)."""
    positive = loaded.prompts([caption] * batch_size)
    negative = loaded.prompts.negative(batch_size)
    noise = seeded_noise(list(range(batch_size)), loaded.clip_shape)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loaded.module.sample(positive.states, negative.states, noise=noise, **sampler)
        if i:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"latency_s": median / batch_size, "clips_per_s": batch_size / median}


def quality(judge: ShapesJudgeNet, fvd, videos: torch.Tensor, labels: dict) -> dict[str, Any]:
    accuracy = judge_accuracy(judge, videos, labels)
    return {"fvd": fake_distance(fvd, videos), "adherence": accuracy.pop("all"), **accuracy,
            **temporal_consistency(videos), "shape_confusion": shape_confusion(judge, videos, labels).tolist()}


def markdown_table(rows: list[dict[str, Any]], notes: str = "") -> str:
    present = [(k, title) for k, title in COLUMNS if any(k in r for r in rows)]
    lines = ["| " + " | ".join(t for _, t in present) + " |", "|" + "---|" * len(present)]

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k)) for k, _ in present) + " |")
    return "\n".join(lines) + ("\n\n" + notes if notes else "") + "\n"


def table_notes(n: int, seed: int, features: int, variant: str, judge_accuracy: dict[str, float], repeats: int,
                latency_batch: int, wall_time_s: float) -> str:
    """What the table's columns mean and how they were measured."""
    return (f"{n} clips per set (held-out prompts, seed {seed}); FVD-shapes = Fréchet distance of the shapes "
            f"judge's {features}-d features to {n} real clips of the same prompts. Adherence = all "
            f"attributes read by the judge match the prompt; count = per clip, colour/shape/direction = per "
            f"captioned object; adherence / direction k obj = the same over the prompts with k objects; same "
            f"shape / dir. 2 obj = of the two-object prompts whose objects differ in it, the share where the "
            f"judge reads both objects alike (one object's words bound to both). "
            f"Judge: {variant} (`judge.variant`); held-out accuracy: "
            + ", ".join(f"{k} {v:.3f}" for k, v in judge_accuracy.items())
            + f". Latency: median of {repeats} runs at batch {latency_batch}, "
            f"{torch.get_num_threads()} CPU threads. Wall time {wall_time_s:.0f} s.")
