"""LightningDataModules that yield (video, text context, negative context) batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_tmd.data.shapes import DEFAULT_SPEED, ShapesDataset
from lightning_tmd.nets.text import PromptEncoder, TextEncoder
from lightning_tmd.parallel import process_rank

VAL_START = 1 << 40  # global index of the first validation clip: splits never overlap


class _EpochPermutation(Sampler[int]):
    """A seeded permutation per epoch, starting after the batches its loader has already served.

    With several processes the permutation is cut into global batches of `batch_size * world` clips
    and each rank takes its contiguous share of every global batch: together the ranks see exactly the
    batches a single process with the global batch size would see.
    """

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.batches_per_epoch * self.loader.batch_size

    def __iter__(self) -> Iterator[int]:
        loader = self.loader
        g = torch.Generator().manual_seed(loader.seed * 1_000_003 + loader.epoch)
        order = torch.randperm(len(loader.dataset), generator=g)
        rank, world = loader.rank_and_world()
        size = loader.batch_size
        batches = order[: loader.batches_per_epoch * size * world].view(-1, world, size)
        yield from batches[loader.batches_done :, rank].flatten().tolist()


class ResumableLoader(DataLoader):
    """A shuffling DataLoader that Lightning checkpoints (`state_dict` / `load_state_dict`):
    a resumed run sees exactly the batches the uninterrupted run would have seen.

    Under data parallelism `batch_size` is per process and each rank reads its share of the global
    batch (`shard=False`: every rank reads the same batches, for checks). Use it with the trainer's
    `use_distributed_sampler=False`: it shards itself.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shard: bool = True, **kwargs: Any) -> None:
        self.seed, self.epoch, self.batches_done, self.shard = seed, 0, 0, shard
        # an own generator: creating an iterator draws a base seed, which must not touch the global RNG
        super().__init__(dataset, batch_size=batch_size, sampler=_EpochPermutation(self), drop_last=True,
                         generator=torch.Generator().manual_seed(seed), **kwargs)

    def rank_and_world(self) -> tuple[int, int]:
        return process_rank() if self.shard else (0, 1)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // (self.batch_size * self.rank_and_world()[1])

    def __len__(self) -> int:
        return self.batches_per_epoch - self.batches_done if not self.epoch_served else self.batches_per_epoch

    @property
    def epoch_served(self) -> bool:
        """Every batch of the epoch was served (a prefetching caller may never exhaust the iterator)."""
        return self.batches_done >= self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        if self.epoch_served:
            self.epoch, self.batches_done = self.epoch + 1, 0
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch
        self.epoch, self.batches_done = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


class ShapesDataModule(L.LightningDataModule):
    """Procedural shapes clips with cached caption embeddings.

    Captions are encoded in the main process (`on_before_batch_transfer`), once per distinct caption;
    without a text encoder (e.g. for the judge) batches carry captions only.
    Batch: video (B, C, T, H, W), captions, labels, context / context_mask (B, S, D) / (B, S),
    negative_context / negative_mask (the negative prompt, expanded to the batch).
    """

    def __init__(self, text_encoder: TextEncoder | None, negative_prompt: str | None = "", frames: int = 8,
                 size: int = 32, max_objects: int = 2, num_train: int = 1_000_000, num_val: int = 256,
                 batch_size: int = 8, val_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, shard: bool = True, speed: float = DEFAULT_SPEED,
                 train_two_object_fraction: float | None = None,
                 object_areas: tuple[float, float] | None = None, shuffle_seed: int | None = None) -> None:
        super().__init__()
        self.prompts = PromptEncoder(text_encoder, negative_prompt) if text_encoder is not None else None
        clip = dict(seed=seed, frames=frames, size=size, max_objects=max_objects, speed=speed,
                    object_areas=None if object_areas is None else tuple(object_areas))
        self.train_set = ShapesDataset(num_train, start=0, two_object_fraction=train_two_object_fraction, **clip)
        self.val_set = ShapesDataset(num_val, start=VAL_START, **clip)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed, self.shard = num_workers, seed, shard
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.clip_shape = (3, frames, size, size)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_set, self.batch_size, seed=self.shuffle_seed, shard=self.shard,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return add_text(batch, self.prompts) if self.prompts is not None else batch


def add_text(batch: dict, prompts: PromptEncoder) -> dict:
    """Add the captions' and the negative prompt's embeddings to a batch."""
    positive = prompts(batch["caption"])
    negative = prompts.negative(len(positive))
    return {**batch, "context": positive.states, "context_mask": positive.mask,
            "negative_context": negative.states, "negative_mask": negative.mask}
