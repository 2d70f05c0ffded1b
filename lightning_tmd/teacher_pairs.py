"""Teacher ODE pairs for the KD warm-up of one-step DMD2-v (Table 4; docs/method.md §Baselines): noise -> the teacher's
CFG sample, on the shapes captions. Generated once (progress bar), cached to disk, reused by every run
with the same teacher and settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_tmd.data.datamodule import VAL_START, ResumableLoader, ShapesDataModule
from lightning_tmd.data.shapes import ShapesDataset
from lightning_tmd.sampling import sample_clips, seeded_noise


class PairsDataset(Dataset):
    """Items {"noise", "video" (the teacher's sample), "caption"} from a cached pairs file."""

    def __init__(self, pairs: dict[str, Any]) -> None:
        self.noise, self.video, self.captions = pairs["noise"], pairs["video"], pairs["captions"]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"noise": self.noise[index], "video": self.video[index], "caption": self.captions[index]}


class TeacherPairsDataModule(ShapesDataModule):
    """(noise, teacher sample, caption) batches with text embeddings; captions are the shapes train
    (and validation) captions, noise is seeded by the pair's index.

    Args:
        teacher_ckpt: the TeacherModule checkpoint that generates the pairs.
        num_pairs, num_val_pairs: pairs to train on and to validate on.
        steps, guidance_scale, shift: the teacher's Euler sampler (CFG with the negative prompt; guidance_scale
            None: the CFG the teacher checkpoint samples with).
        generate_batch_size: clips per teacher call while generating.
        cache_dir: where the pairs file goes; its name is a hash of the teacher file and the settings.
        Other arguments: as `ShapesDataModule`.
    """

    def __init__(self, teacher_ckpt: str, num_pairs: int = 512, num_val_pairs: int = 32, steps: int = 25,
                 guidance_scale: float | None = None, shift: float = 3.0, generate_batch_size: int = 32,
                 cache_dir: str = ".cache/lightning_tmd/teacher_pairs", **shapes: Any) -> None:
        super().__init__(**shapes)
        self.teacher_ckpt = teacher_ckpt
        self.num_pairs, self.num_val_pairs = num_pairs, num_val_pairs
        self.sampler = {"steps": steps, "guidance_scale": guidance_scale, "shift": shift}
        self.generate_batch_size = generate_batch_size
        self.cache_dir = Path(cache_dir)
        self.pairs: dict[str, dict[str, Any]] = {}

    def cache_path(self) -> Path:
        """The pairs file: named by the teacher file (path, size, mtime), the sampler and the clips."""
        teacher = Path(self.teacher_ckpt)
        if not teacher.is_file():
            raise FileNotFoundError(f"data.teacher_ckpt: no teacher checkpoint at '{teacher}'. Train it first: "
                                    "python -m lightning_tmd.train stage=teacher experiment=shapes_teacher")
        if self.sampler["guidance_scale"] is None:
            from lightning_tmd.checkpoints import read_checkpoint, sampling_guidance

            checkpoint = read_checkpoint("data.teacher_ckpt", teacher)
            self.sampler["guidance_scale"] = sampling_guidance(checkpoint)
        stat = teacher.stat()
        key = {"teacher": [str(teacher.resolve()), stat.st_size, stat.st_mtime_ns], "sampler": self.sampler,
               "pairs": [self.num_pairs, self.num_val_pairs], "clip": self.clip_shape, "seed": self.seed,
               "negative_prompt": self.prompts.negative_prompt, "text": type(self.prompts.encoder).__name__,
               "objects": self.train_set.max_objects}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"pairs_{digest}.pt"

    def prepare_data(self) -> None:
        """Generate and cache the pairs unless a cache file for these settings exists."""
        path = self.cache_path()
        if path.is_file():
            return
        from lightning_tmd.modules.teacher import TeacherModule

        device = "cuda" if torch.cuda.is_available() else "cpu"
        teacher = TeacherModule.load_from_checkpoint(self.teacher_ckpt, map_location=device).eval()
        pairs = {split: self.generate(teacher, dataset, count, first_seed)
                 for split, dataset, count, first_seed in (("train", self.train_set, self.num_pairs, 0),
                                                           ("val", self.val_set, self.num_val_pairs, VAL_START))}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"pairs": pairs, "sampler": self.sampler, "teacher_ckpt": self.teacher_ckpt}, partial)
        partial.replace(path)  # a killed run never leaves a half-written cache behind

    def generate(self, teacher: torch.nn.Module, dataset: ShapesDataset, count: int,
                 first_seed: int) -> dict[str, Any]:
        if count > len(dataset):
            raise ValueError(f"data: {count} pairs asked for, the split has {len(dataset)} clips")
        captions = [dataset[i]["caption"] for i in range(count)]
        seeds = [first_seed + self.seed * 1_000_003 + i for i in range(count)]
        clips, _ = sample_clips(teacher, self.prompts, captions, seeds, self.clip_shape,
                                batch_size=self.generate_batch_size, progress=True, **self.sampler)
        return {"noise": seeded_noise(seeds, self.clip_shape), "video": clips.float(), "captions": captions}

    def setup(self, stage: str) -> None:
        path = self.cache_path()
        if not path.is_file():
            self.prepare_data()
        try:
            self.pairs = torch.load(path, map_location="cpu", weights_only=False)["pairs"]
        except Exception as error:  # a truncated or foreign file
            raise RuntimeError(f"teacher pairs cache '{path}' is unreadable ({error}): delete it to "
                               "regenerate the pairs") from error

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(PairsDataset(self.pairs["train"]), self.batch_size, seed=self.shuffle_seed,
                               num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(PairsDataset(self.pairs["val"]), batch_size=self.val_batch_size)
