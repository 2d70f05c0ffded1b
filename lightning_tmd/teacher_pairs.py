"""Teacher ODE pairs for the KD warm-up of one-step DMD2-v (Table 4; docs/method.md §Baselines): noise -> the
teacher's CFG sample. Generated once, each process of a run for its share, as chunk files that a restarted run
completes (only the missing or unreadable chunks are generated again), cached on disk and reused by every run
with the same teacher and settings.

* `TeacherPairsDataModule`: on the shapes captions (the embedded default, `data=teacher_pairs`);
* `LatentTeacherPairsDataModule`: on the clips of a preprocessed latent folder, with their stored caption
  embeddings (Wan2.1, `data=teacher_pairs_latents`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lightning_tmd.checkpoints import PAPER_GUIDANCE, read_checkpoint, sampling_guidance, sampling_state_dict
from lightning_tmd.data.datamodule import VAL_START, ResumableLoader, ShapesDataModule
from lightning_tmd.data.latents import META_FILE, LatentsDataModule
from lightning_tmd.generators import load_module
from lightning_tmd.modules.teacher import TeacherModule
from lightning_tmd.nets.wan_folder import resolve_transformer_folder
from lightning_tmd.parallel import fill_empty_nets
from lightning_tmd.sampling import sample_clips, seeded_noise

PAIR_TENSORS = ("noise", "video")
SPLITS = {"train": 0, "val": VAL_START}  # split -> the first noise seed of its pairs


def process_share() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def generation_device() -> torch.device:
    """This process's GPU (the one Lightning set current), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def pairs_guidance(guidance_scale: float | None, teacher_ckpt: str | None) -> float:
    """The pairs' CFG: `guidance_scale`, else the one the teacher checkpoint samples with (the paper's 5 for a
    teacher without one, model.path's Wan)."""
    if guidance_scale is not None:
        return guidance_scale
    return sampling_guidance(read_checkpoint("data.teacher_ckpt", teacher_ckpt)) if teacher_ckpt else PAPER_GUIDANCE


def file_stamp(path: Path) -> list[Any]:
    """What identifies a file's version in a cache key: its resolved path, size and modification time."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


class PairChunks:
    """The pairs of one split as chunk files `<folder>/<split>_<k>.safetensors` with tensors noise and video;
    chunk k holds pairs k * size .. (k + 1) * size - 1. Each chunk is written whole (a `.partial` file renamed),
    so a killed generation leaves complete chunks only. Training reads one pair at a time from memory-mapped
    chunks (`item`), so no process holds the pairs in memory (10k Wan pairs are ~170 GB)."""

    def __init__(self, folder: Path, split: str, count: int, size: int) -> None:
        self.folder, self.split, self.count, self.size = folder, split, count, size
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # open files stay in their process (DataLoader workers)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.count / self.size)

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.size, min(self.count, (k + 1) * self.size)

    def path(self, k: int) -> Path:
        return self.folder / f"{self.split}_{k:05d}.safetensors"

    def is_complete(self, k: int) -> bool:
        """Whether chunk k is on disk with both tensors of its length (read from its header)."""
        start, stop = self.bounds(k)
        try:
            with safe_open(str(self.path(k)), framework="pt") as f:
                return all(f.get_slice(name).get_shape()[0] == stop - start for name in PAIR_TENSORS)
        except Exception:  # missing, truncated or foreign
            return False

    def missing(self, rank: int = 0, world: int = 1) -> list[int]:
        """The incomplete chunks of process `rank` of `world` (chunks k with k % world == rank)."""
        return [k for k in range(rank, self.num_chunks, world) if not self.is_complete(k)]

    def generate(self, make_chunk: Callable[[int, int], dict[str, torch.Tensor]], rank: int = 0,
                 world: int = 1) -> int:
        """Write this process's missing chunks, `make_chunk(start, stop)` giving each; returns how many."""
        todo = self.missing(rank, world)
        self.folder.mkdir(parents=True, exist_ok=True)
        for k in tqdm(todo, desc=f"teacher pairs ({self.split}, rank {rank})", disable=not todo):
            tensors = make_chunk(*self.bounds(k))
            partial = self.path(k).with_suffix(".partial")
            save_file({name: tensors[name].float().contiguous().cpu() for name in PAIR_TENSORS}, str(partial))
            partial.replace(self.path(k))
        return len(todo)

    def check_complete(self) -> None:
        """Raise, naming the chunk, unless every chunk is on disk and readable."""
        missing = self.missing()
        if missing:
            raise RuntimeError(f"teacher pairs chunk '{self.path(missing[0])}' is missing or unreadable: delete it "
                               "and start the run again to generate it")

    def item(self, index: int) -> dict[str, torch.Tensor]:
        """Pair `index`: {"noise", "video"}, read from its memory-mapped chunk."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        k, row = divmod(index, self.size)
        if k not in self._open:
            self._open[k] = safe_open(str(self.path(k)), framework="pt")
        return {name: self._open[k].get_slice(name)[row : row + 1][0] for name in PAIR_TENSORS}

    def read(self) -> dict[str, torch.Tensor]:
        """Every pair in memory: {"noise", "video"} (for inspection; training reads `item`)."""
        self.check_complete()
        chunks = [load_file(str(self.path(k))) for k in range(self.num_chunks)]
        return {name: torch.cat([chunk[name] for chunk in chunks]) for name in PAIR_TENSORS}


class PairsDataset(Dataset):
    """Items {"noise", "video" (the teacher's sample)} of the pairs, with the fields `text(index)` gives
    (the caption, and for latents the stored embedding)."""

    def __init__(self, pairs: PairChunks, text: Callable[[int], dict[str, Any]]) -> None:
        self.pairs, self.text = pairs, text

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.pairs.item(index), **self.text(index)}


class TeacherPairsMixin:
    """What both pair DataModules share: the cache folder named by a hash of what makes the pairs, generation
    of each process's share of the chunks, and reading them all back."""

    num_pairs: int
    num_val_pairs: int
    sampler: dict[str, Any]
    generate_batch_size: int
    cache_dir: Path
    clip_shape: tuple[int, ...]
    pairs: dict[str, PairChunks]
    train_set: Any
    val_set: Any

    def cache_key(self) -> dict[str, Any]:
        raise NotImplementedError

    def build_teacher(self, device: torch.device) -> TeacherModule:
        raise NotImplementedError

    def pair_chunk(self, teacher: TeacherModule, split: str, start: int, stop: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_pairs, "val": self.num_val_pairs}

    def split_set(self, split: str) -> Any:
        """The clips the pairs of `split` take their prompts from."""
        return self.train_set if split == "train" else self.val_set

    def setup(self, stage: str) -> None:
        self.load_pairs()

    def cache_folder(self) -> Path:
        digest = hashlib.sha1(json.dumps(self.cache_key(), sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"pairs_{digest}"

    def chunks(self) -> dict[str, PairChunks]:
        folder = self.cache_folder()
        return {split: PairChunks(folder, split, count, self.generate_batch_size)
                for split, count in self.split_sizes().items()}

    def pair_seeds(self, split: str, start: int, stop: int) -> list[int]:
        """Noise seed of each pair: its split's first seed plus its index (and the data seed's offset)."""
        return [SPLITS[split] + self.pair_seed * 1_000_003 + i for i in range(start, stop)]

    def generate_share(self, rank: int = 0, world: int = 1) -> int:
        """Generate process `rank`'s missing chunks of every split (the teacher is built only when some are
        missing); returns how many chunks it wrote."""
        chunks = self.chunks()
        if not any(c.missing(rank, world) for c in chunks.values()):
            return 0
        teacher = self.build_teacher(generation_device())
        return sum(c.generate(lambda start, stop, s=split: self.pair_chunk(teacher, s, start, stop), rank, world)
                   for split, c in chunks.items())

    def load_pairs(self) -> None:
        """Every process generates its share, waits for the others, then checks that every chunk is there."""
        self.generate_share(*process_share())
        if process_share()[1] > 1:
            torch.distributed.barrier()
        self.pairs = self.chunks()
        for chunks in self.pairs.values():
            chunks.check_complete()


class TeacherPairsDataModule(TeacherPairsMixin, ShapesDataModule):
    """(noise, teacher sample, caption) batches with text embeddings; captions are the shapes train
    (and validation) captions, noise is seeded by the pair's index.

    Args:
        teacher_ckpt: the TeacherModule checkpoint that generates the pairs.
        num_pairs, num_val_pairs: pairs to train on and to validate on.
        steps, guidance_scale, shift: the teacher's Euler sampler (CFG with the negative prompt; guidance_scale
            None: the CFG the teacher checkpoint samples with).
        generate_batch_size: clips per teacher call while generating (and per chunk file).
        cache_dir: where the pairs folder goes; its name is a hash of the teacher file and the settings.
        Other arguments: as `ShapesDataModule`.
    """

    def __init__(self, teacher_ckpt: str, num_pairs: int = 512, num_val_pairs: int = 32, steps: int = 25,
                 guidance_scale: float | None = None, shift: float = 3.0, generate_batch_size: int = 32,
                 cache_dir: str = ".cache/lightning_tmd/teacher_pairs", **shapes: Any) -> None:
        super().__init__(**shapes)
        if not Path(teacher_ckpt).is_file():
            raise FileNotFoundError(f"data.teacher_ckpt: no teacher checkpoint at '{teacher_ckpt}'. Train it first: "
                                    "python -m lightning_tmd.train stage=teacher experiment=shapes_teacher")
        self.teacher_ckpt = teacher_ckpt
        self.num_pairs, self.num_val_pairs = num_pairs, num_val_pairs
        for split, count in self.split_sizes().items():
            if count > len(self.split_set(split)):
                raise ValueError(f"data.num_{'val_' if split == 'val' else ''}pairs={count}: the {split} split has "
                                 f"{len(self.split_set(split))} clips")
        self.sampler = {"steps": steps, "guidance_scale": pairs_guidance(guidance_scale, teacher_ckpt), "shift": shift}
        self.generate_batch_size = generate_batch_size
        self.cache_dir = Path(cache_dir)
        self.pair_seed = self.seed
        self.pairs: dict[str, PairChunks] = {}
        self._captions: dict[str, list[str]] = {}

    def cache_key(self) -> dict[str, Any]:
        """The teacher file (path, size, mtime), the sampler and the clips."""
        return {"teacher": file_stamp(Path(self.teacher_ckpt)), "sampler": self.sampler,
                "pairs": [self.num_pairs, self.num_val_pairs], "clip": self.clip_shape, "seed": self.seed,
                "negative_prompt": self.prompts.negative_prompt, "text": type(self.prompts.encoder).__name__,
                "objects": self.train_set.max_objects, "chunk": self.generate_batch_size}

    def build_teacher(self, device: torch.device) -> TeacherModule:
        checkpoint = read_checkpoint("data.teacher_ckpt", self.teacher_ckpt, mmap=True)
        return load_module(TeacherModule, self.teacher_ckpt, checkpoint, device).eval()

    def captions(self, split: str, start: int, stop: int) -> list[str]:
        """Captions of the pairs start..stop - 1 of `split` (the split's captions are rendered once)."""
        if split not in self._captions:
            dataset = self.split_set(split)
            self._captions[split] = [dataset[i]["caption"] for i in range(self.split_sizes()[split])]
        return self._captions[split][start:stop]

    def pair_chunk(self, teacher: TeacherModule, split: str, start: int, stop: int) -> dict[str, torch.Tensor]:
        seeds = self.pair_seeds(split, start, stop)
        clips, _ = sample_clips(teacher, self.prompts, self.captions(split, start, stop), seeds, self.clip_shape,
                                batch_size=self.generate_batch_size, **self.sampler)
        return {"noise": seeded_noise(seeds, self.clip_shape), "video": clips.float()}

    def pairs_dataset(self, split: str) -> PairsDataset:
        captions = self.captions(split, 0, len(self.pairs[split]))
        return PairsDataset(self.pairs[split], lambda index: {"caption": captions[index]})

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.pairs_dataset("train"), self.batch_size, seed=self.shuffle_seed,
                               num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.pairs_dataset("val"), batch_size=self.val_batch_size)


class LatentTeacherPairsDataModule(TeacherPairsMixin, LatentsDataModule):
    """KD pairs on a preprocessed latent folder (Wan2.1): for its clips' stored caption embeddings, seeded
    noise -> the frozen teacher's CFG sample with the stored negative prompt. Batches have the keys of
    `LatentsDataModule` with "video" the teacher's sample and "noise" its starting noise.

    Args:
        model: the run's model group; with `teacher_ckpt` None the teacher is `model.path`'s Wan.
        teacher_ckpt: a TeacherModule checkpoint whose sampling weights (and CFG) the teacher takes.
        num_pairs: pairs on the folder's training clips (None: every training clip); num_val_pairs: on its
            validation clips (at most `num_val`).
        steps, guidance_scale, shift: the teacher's Euler sampler (guidance_scale None: the teacher checkpoint's
            sampling CFG, or the paper's 5 for `model.path`'s Wan).
        generate_batch_size: clips per teacher call (and per chunk file). pair_seed: offsets the noise seeds.
        cache_dir: where the pairs folder goes (named by a hash of the folder, the teacher and the settings).
        Other arguments: as `LatentsDataModule`.
    """

    def __init__(self, path: str, model: dict[str, Any], teacher_ckpt: str | None = None,
                 num_pairs: int | None = None, num_val_pairs: int = 8, steps: int = 50,
                 guidance_scale: float | None = None, shift: float = 5.0, generate_batch_size: int = 4,
                 pair_seed: int = 0, cache_dir: str = ".cache/lightning_tmd/teacher_pairs", **latents: Any) -> None:
        super().__init__(path, **latents)
        self.model, self.teacher_ckpt = dict(model), teacher_ckpt
        self.num_pairs = len(self.train_set) if num_pairs is None else num_pairs
        self.num_val_pairs = num_val_pairs
        if not 1 <= self.num_pairs <= len(self.train_set):
            raise ValueError(f"data.num_pairs={self.num_pairs}: give 1 to the {len(self.train_set)} training clips of "
                             "data.path (null: all of them)")
        if not 1 <= num_val_pairs <= len(self.val_set):
            raise ValueError(f"data.num_val_pairs={num_val_pairs}: give 1 to the {len(self.val_set)} validation clips "
                             "of data.path (data.num_val)")
        if teacher_ckpt and not Path(teacher_ckpt).is_file():
            raise FileNotFoundError(f"data.teacher_ckpt: no teacher checkpoint at '{teacher_ckpt}' (null: the teacher "
                                    "is model.path's Wan)")
        self.sampler = {"steps": steps, "guidance_scale": pairs_guidance(guidance_scale, teacher_ckpt), "shift": shift}
        self.generate_batch_size, self.pair_seed = generate_batch_size, pair_seed
        self.cache_dir = Path(cache_dir)
        self.pairs: dict[str, PairChunks] = {}

    def cache_key(self) -> dict[str, Any]:
        """The latent folder (its meta file), the teacher's weights (its transformer folder's files, or the
        checkpoint), the sampler and the pairs."""
        teacher = ([file_stamp(Path(self.teacher_ckpt))] if self.teacher_ckpt else
                   [file_stamp(f) for f in sorted(resolve_transformer_folder(self.model["path"]).iterdir())])
        return {"latents": file_stamp(self.folder / META_FILE), "teacher": teacher, "sampler": self.sampler,
                "pairs": [self.num_pairs, self.num_val_pairs], "seed": self.pair_seed, "clip": list(self.clip_shape),
                "dtype": self.model.get("dtype"), "chunk": self.generate_batch_size}

    def build_teacher(self, device: torch.device) -> TeacherModule:
        teacher = TeacherModule(self.model, ema_decay=None)
        fill_empty_nets(teacher, device)  # model.meta_init: the whole teacher, read straight onto the device
        if self.teacher_ckpt:
            teacher.net.load_state_dict(sampling_state_dict(self.teacher_ckpt))
        return teacher.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def pair_chunk(self, teacher: TeacherModule, split: str, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Pairs start..stop - 1 of `split`: seeded noise and the teacher's CFG samples from it with the clips'
        stored caption embeddings and the stored negative prompt."""
        items = [self.split_set(split).text(i) for i in range(start, stop)]
        device = teacher.device
        context = torch.stack([item["context"] for item in items]).to(device)
        negative = self.prompts.negative(len(items)).states.to(device)
        noise = seeded_noise(self.pair_seeds(split, start, stop), self.clip_shape)
        clips, _ = teacher.sample(context, negative, noise=noise.to(device), **self.sampler)
        return {"noise": noise, "video": clips.float().cpu()}

    def pairs_dataset(self, split: str) -> PairsDataset:
        return PairsDataset(self.pairs[split], self.split_set(split).text)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.pairs_dataset("train"), self.batch_size, seed=self.seed,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.pairs_dataset("val"), batch_size=self.val_batch_size, num_workers=self.num_workers)
