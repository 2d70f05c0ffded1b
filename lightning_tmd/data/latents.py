"""Training on precomputed shards of VAE latents and text embeddings (`data=latents data.path=<folder>`).

The folder is written by `python -m lightning_tmd.data.preprocess` and holds

* `shard_00000.safetensors`, ...: tensors `latents` (n, C, T', H', W'), `context` (n, S, D) and
  `context_mask` (n, S); metadata `captions`, `files`, `skipped` (JSON lists) and `settings` (JSON);
* `prompts.safetensors`: the negative prompt's and the sample prompts' embeddings;
* `meta.json`: latent shape, text width and length, clip settings, shard list, skipped videos.

Every shard is checked from its safetensors header when the DataModule is built, so a missing,
truncated or mismatched shard fails before training starts, naming the shard, the field and the fix.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from lightning_tmd.data.datamodule import ResumableLoader
from lightning_tmd.nets.text import TextEmbedding

log = logging.getLogger(__name__)

META_FILE = "meta.json"
PROMPTS_FILE = "prompts.safetensors"
SHARD_TENSORS = ("latents", "context", "context_mask")
PROMPT_TENSORS = ("negative_context", "negative_mask", "sample_context", "sample_mask")
REPROCESS = ("re-run `python -m lightning_tmd.data.preprocess` with the same arguments (it keeps valid shards "
             "and rewrites missing or invalid ones)")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


@dataclass
class ShardHeader:
    """What a shard's safetensors header says, read without loading tensors."""

    path: Path
    num_clips: int
    latent_shape: tuple[int, ...]  # (C, T', H', W')
    text_length: int
    text_dim: int
    metadata: dict[str, str]

    @property
    def captions(self) -> list[str]:
        return json.loads(self.metadata.get("captions", "[]"))

    @property
    def files(self) -> list[str]:
        return json.loads(self.metadata.get("files", "[]"))

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return json.loads(self.metadata.get("skipped", "[]"))


def read_header(path: Path, names: tuple[str, ...]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes of the tensors `names` and the metadata of a safetensors file; ValueError naming the file
    when it is missing, unreadable or truncated, or lacks one of the tensors."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing. {REPROCESS}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = set(f.keys()), f.metadata() or {}
            missing = [n for n in names if n not in keys]
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names if n in keys}
    except Exception as err:  # safetensors raises its own error type for bad headers and short files
        raise ValueError(f"{path}: unreadable or truncated ({err}). Delete it and {REPROCESS}") from err
    if missing:
        raise ValueError(f"{path}: tensor(s) {', '.join(missing)} missing. Delete it and {REPROCESS}")
    return shapes, metadata


def read_shard_header(path: str | Path) -> ShardHeader:
    """The header of one shard, checked for the tensors and consistent clip counts."""
    path = Path(path)
    shapes, metadata = read_header(path, SHARD_TENSORS)
    latents, context, mask = (shapes[n] for n in SHARD_TENSORS)
    if len(latents) != 5 or len(context) != 3 or len(mask) != 2:
        raise ValueError(f"{path}: tensor ranks {len(latents)}, {len(context)}, {len(mask)} for latents, context, "
                         f"context_mask (expected 5, 3, 2). Delete it and {REPROCESS}")
    n = latents[0]
    captions = json.loads(metadata.get("captions", "[]"))
    if context[0] != n or mask != context[:2] or len(captions) != n:
        raise ValueError(f"{path}: {n} latents, {context[0]} contexts, mask {mask}, {len(captions)} captions do "
                         f"not agree. Delete it and {REPROCESS}")
    return ShardHeader(path, n, latents[1:], context[1], context[2], metadata)


def read_meta(folder: str | Path, field: str = "data.path") -> dict[str, Any]:
    """`meta.json` of a preprocessed folder; FileNotFoundError naming `field` when it is absent."""
    folder = Path(folder).expanduser()
    path = folder / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{field}: no {META_FILE} in '{folder}'. Preprocess the videos first: python -m "
                                f"lightning_tmd.data.preprocess videos=<folder> captions=<file> out={folder} "
                                "model_path=<Wan diffusers folder>")
    return json.loads(path.read_text())


def check_latents_fit_model(path: str | Path, model: dict[str, Any]) -> None:
    """The transformer (its config dict) must take the stored latents: channels and a patch size that
    divides the latent grid."""
    meta = read_meta(path)
    channels, *grid = meta["latent_shape"]
    for key in ("in_channels", "out_channels"):
        if model[key] != channels:
            raise ValueError(f"model.config.{key}={model[key]} but the latents in data.path '{path}' have {channels} "
                             f"channels: set model.config.in_channels=out_channels={channels}")
    patch = list(model["patch_size"])
    if any(g % p for g, p in zip(grid, patch)):
        raise ValueError(f"model.config.patch_size={patch} does not divide the latent grid {grid} (frames x height x "
                         f"width) of data.path '{path}': choose a patch size that divides it, or preprocess other "
                         "frames/height/width")


class LatentShardsDataset(Dataset):
    """Clips `start .. stop - 1` (global order: shard by shard) of checked shards. Items: video (the
    latents, float32), caption, context (S, D) float32, context_mask (S,) bool. Shards are memory-mapped
    and read one clip at a time."""

    def __init__(self, shards: list[ShardHeader], start: int, stop: int) -> None:
        self.shards = shards
        self.offsets = [0]
        for shard in shards:
            self.offsets.append(self.offsets[-1] + shard.num_clips)
        if not 0 <= start <= stop <= self.offsets[-1]:
            raise ValueError(f"clip range {start}..{stop} outside the {self.offsets[-1]} clips of the shards")
        self.start, self.stop = start, stop
        self.captions = [shard.captions for shard in shards]
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of the dataset's `index`-th clip."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        clip = self.start + index
        shard = bisect.bisect_right(self.offsets, clip) - 1
        return shard, clip - self.offsets[shard]

    def _handle(self, shard: int) -> Any:
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.shards[shard].path), framework="pt")
        return self._open[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, row = self.locate(index)
        return {"video": self._handle(shard).get_slice("latents")[row : row + 1][0].float(), **self.text(index)}

    def text(self, index: int) -> dict[str, Any]:
        """Clip `index`'s caption, context and context_mask, without reading its latents."""
        shard, row = self.locate(index)
        f = self._handle(shard)
        return {"caption": self.captions[shard][row], "context": f.get_slice("context")[row : row + 1][0].float(),
                "context_mask": f.get_slice("context_mask")[row : row + 1][0].bool()}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # open files stay in their process (DataLoader workers)


class PrecomputedPrompts:
    """The `PromptEncoder` interface (`dim`, `__call__`, `negative`) over embeddings computed at
    preprocessing: the sample prompts and the negative prompt. Other captions cannot be encoded."""

    def __init__(self, prompts: list[str], states: torch.Tensor, mask: torch.Tensor, negative_prompt: str,
                 negative: TextEmbedding, source: str = PROMPTS_FILE) -> None:
        self.prompts = list(prompts)
        self.rows = {p: i for i, p in enumerate(self.prompts)}
        self.states, self.mask = states.float(), mask.bool()
        self.negative_prompt = negative_prompt
        self._negative = TextEmbedding(negative.states.float(), negative.mask.bool())
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path) -> PrecomputedPrompts:
        """Load `prompts.safetensors` (written by preprocessing)."""
        path = Path(path)
        read_header(path, PROMPT_TENSORS)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            t = {name: f.get_tensor(name) for name in PROMPT_TENSORS}
        return cls(json.loads(metadata["sample_prompts"]), t["sample_context"], t["sample_mask"],
                   metadata["negative_prompt"], TextEmbedding(t["negative_context"], t["negative_mask"]), str(path))

    @property
    def dim(self) -> int:
        return self._negative.states.shape[-1]

    @property
    def max_length(self) -> int:
        return self._negative.states.shape[-2]

    def __call__(self, captions: list[str]) -> TextEmbedding:
        missing = [c for c in dict.fromkeys(captions) if c not in self.rows]
        if missing:
            raise KeyError(f"prompt(s) {missing} were not preprocessed ({self.source} holds {len(self.prompts)} "
                           "sample prompts): add them to sample_prompts=[...] and re-run python -m "
                           "lightning_tmd.data.preprocess with the same arguments (shards are kept), or sample "
                           "one of the preprocessed prompts")
        index = torch.tensor([self.rows[c] for c in captions], dtype=torch.long)
        return TextEmbedding(self.states[index], self.mask[index])

    def negative(self, batch_size: int) -> TextEmbedding:
        """The negative prompt's embedding, expanded to the batch (no copy)."""
        neg = self._negative
        return TextEmbedding(neg.states.expand(batch_size, -1, -1), neg.mask.expand(batch_size, -1))


def check_shard(header: ShardHeader, meta: dict[str, Any], expected_latent_shape: tuple[int, ...] | None,
                expected_text_dim: int | None) -> None:
    """A shard agrees with meta.json and with what the run expects; the error names the shard and field."""
    name = header.path.name
    for field, have, want in (("latent shape", header.latent_shape, tuple(meta["latent_shape"])),
                              ("text width", header.text_dim, meta["text_dim"]),
                              ("text length", header.text_length, meta["text_max_length"])):
        if have != want:
            raise ValueError(f"{header.path}: {field} {have} differs from {want} in {META_FILE}: the shard comes from "
                             f"another preprocessing run. Delete {name} and {REPROCESS}")
    if expected_latent_shape is not None and header.latent_shape != tuple(expected_latent_shape):
        raise ValueError(f"{header.path}: latent shape {header.latent_shape} but the run expects "
                         f"{tuple(expected_latent_shape)} (data.expected_latent_shape): set it to "
                         f"{list(header.latent_shape)} or preprocess with the frames/height/width that give it")
    if expected_text_dim is not None and header.text_dim != expected_text_dim:
        raise ValueError(f"{header.path}: text width {header.text_dim} but the run expects {expected_text_dim} "
                         f"(data.expected_text_dim, from text.dim): use the text config the shards were "
                         f"preprocessed with (meta.json: {meta.get('text_encoder')}) or preprocess with this one")


def check_shards(folder: Path, meta: dict[str, Any], expected_latent_shape: tuple[int, ...] | None = None,
                 expected_text_dim: int | None = None) -> list[ShardHeader]:
    """Read and check every shard listed in meta.json (headers only)."""
    headers = []
    for entry in meta["shards"]:
        header = read_shard_header(folder / entry["name"])
        if header.num_clips != entry["clips"]:
            raise ValueError(f"{header.path}: {header.num_clips} clips but {META_FILE} lists {entry['clips']}. "
                             f"Delete it and {REPROCESS}")
        check_shard(header, meta, expected_latent_shape, expected_text_dim)
        headers.append(header)
    return headers


class LatentsDataModule(L.LightningDataModule):
    """Batches from preprocessed latent shards, with the keys of `ShapesDataModule`: video (the
    latents), caption, context / context_mask (stored), negative_context / negative_mask (the stored
    negative prompt, expanded to the batch).

    Args:
        path: the preprocessed folder.
        negative_prompt: when set, must equal the negative prompt the folder was preprocessed with.
        num_val: the last `num_val` clips are the validation split; the train split never sees them.
        expected_latent_shape, expected_text_dim: what the run needs; every shard is checked against them.
        vae_path: a Wan diffusers folder (or its vae/): enables `decode` (sample videos instead of
            latent previews).
        vae_dtype: dtype of the VAE used by `decode`.
        decode_batch_size: clips per VAE decode call.
    """

    def __init__(self, path: str, negative_prompt: str | None = None, num_val: int = 16, batch_size: int = 1,
                 val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 expected_latent_shape: list[int] | None = None, expected_text_dim: int | None = None,
                 vae_path: str | None = None, vae_dtype: str = "float32", decode_batch_size: int = 1) -> None:
        super().__init__()
        self.folder = Path(path).expanduser()
        self.meta = read_meta(self.folder)
        shards = check_shards(self.folder, self.meta, expected_latent_shape, expected_text_dim)
        self.prompts = PrecomputedPrompts.from_file(self.folder / PROMPTS_FILE)
        self.check_prompts(negative_prompt)
        total = sum(s.num_clips for s in shards)
        if not 0 <= num_val < total:
            raise ValueError(f"data.num_val={num_val} leaves no training clips: data.path '{self.folder}' holds "
                             f"{total}; lower data.num_val")
        if total - num_val < batch_size:
            raise ValueError(f"data.batch_size={batch_size} exceeds the {total - num_val} training clips of "
                             f"'{self.folder}': lower data.batch_size (or data.num_val)")
        self.train_set = LatentShardsDataset(shards, 0, total - num_val)
        self.val_set = LatentShardsDataset(shards, total - num_val, total)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.clip_shape = tuple(self.meta["latent_shape"])
        self.codec = self.load_codec(vae_path, vae_dtype) if vae_path else None
        self.decode_batch_size = decode_batch_size

    def check_prompts(self, negative_prompt: str | None) -> None:
        if self.prompts.dim != self.meta["text_dim"]:
            raise ValueError(f"{self.prompts.source}: text width {self.prompts.dim} differs from "
                             f"{self.meta['text_dim']} in {META_FILE}. Delete it and {REPROCESS}")
        if negative_prompt is not None and negative_prompt != self.prompts.negative_prompt:
            raise ValueError(f"text.negative_prompt '{negative_prompt[:40]}...' differs from the one data.path was "
                             f"preprocessed with ('{self.prompts.negative_prompt[:40]}...'): use that text config or "
                             "re-run preprocessing with this one")

    def load_codec(self, vae_path: str, dtype: str) -> Any:
        from lightning_tmd.nets.codec import WanVAECodec

        codec = WanVAECodec.from_folder(vae_path, dtype, field="data.vae_path")
        if codec.channels != self.clip_shape[0]:
            raise ValueError(f"data.vae_path: the VAE has {codec.channels} latent channels but the shards hold "
                             f"{self.clip_shape[0]}: point it at the VAE the folder was preprocessed with "
                             f"({self.meta.get('model_path')})")
        return codec

    @property
    def sample_prompts(self) -> list[str]:
        """The prompts preprocessed for sampling (the sample callback's default)."""
        return self.prompts.prompts

    @property
    def can_decode(self) -> bool:
        return self.codec is not None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents (B, C, T', H', W') -> clips in [-1, 1] on the latents' device (needs data.vae_path)."""
        if self.codec is None:
            raise RuntimeError("decoding latents needs a VAE: set data.vae_path to the Wan diffusers folder")
        self.codec.to(latents.device)
        return torch.cat([self.codec.decode(chunk) for chunk in latents.split(self.decode_batch_size)])

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_set, self.batch_size, seed=self.seed, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        negative = self.prompts.negative(len(batch["video"]))
        return {**batch, "negative_context": negative.states, "negative_mask": negative.mask}
