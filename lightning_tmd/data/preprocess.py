"""Videos + captions -> shards of Wan VAE latents and text embeddings, for training with `data=latents`.

    python -m lightning_tmd.data.preprocess videos=<folder> captions=<file.csv|file.jsonl> out=<folder> \
        model_path=<Wan diffusers folder> [text=umt5] [frames=81 height=480 width=832 frame_stride=1]

Captions: a CSV with columns `file,caption` or JSON lines with keys `file`, `caption`; `file` is relative
to the videos folder. Each video gives one clip: frames 0, s, 2s, ... (s = frame_stride), scaled to cover
height x width and centre-cropped. A video that cannot be used (an empty or unreadable file, too few
frames, an empty caption) is skipped and listed with the reason: in the log, in its shard's metadata and
under "skipped" in meta.json; the run fails, naming the videos folder, only when every video is skipped.
Clips are assigned to shards in sorted (file, caption) order, and each shard is written atomically, so a
killed run re-run with the same arguments keeps the valid shards and writes the rest (a shard is written
again when one of its skipped videos has been replaced since). The folder layout is described in
`lightning_tmd.data.latents`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lightning_tmd.app import CONFIG_DIR
from lightning_tmd.data.latents import (
    META_FILE,
    PROMPT_TENSORS,
    PROMPTS_FILE,
    read_header,
    read_shard_header,
    shard_name,
)
from lightning_tmd.nets.codec import FRAME_CHUNK, WanVAECodec
from lightning_tmd.nets.text import TextEmbedding, TextEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class CaptionedVideo:
    file: str  # relative to the videos folder
    caption: str


# -- inputs ------------------------------------------------------------------------------------------
def read_captions(path: str | Path) -> list[CaptionedVideo]:
    """The (file, caption) pairs of a CSV (columns file, caption) or JSONL file, sorted."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"captions: no file at '{path}'")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"captions: line {number} of '{path}' is not JSON ({err})") from err
    else:
        raise ValueError(f"captions: '{path}' must be a .csv (columns file,caption) or a .jsonl (keys file, caption)")
    for number, row in enumerate(rows, 1):
        missing = {"file", "caption"} - set(row)
        if missing:
            raise ValueError(f"captions: entry {number} of '{path}' lacks {sorted(missing)}: a CSV needs the columns "
                             "file,caption and a JSONL line the keys file and caption")
    if not rows:
        raise ValueError(f"captions: '{path}' lists no videos")
    return sorted(CaptionedVideo(str(row["file"]), str(row["caption"] or "")) for row in rows)


def check_videos_exist(items: list[CaptionedVideo], folder: Path) -> None:
    """Every listed video is a file in `folder` (checked before anything is encoded)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"videos: the folder '{folder}' does not exist")
    missing = sorted({item.file for item in items if not (folder / item.file).is_file()})
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise FileNotFoundError(f"videos: {len(missing)} video(s) listed in the captions file are missing from "
                                f"'{folder}': {shown}. Add them or remove their rows from the captions file")


def read_frames(path: Path, count: int, stride: int) -> tuple[np.ndarray, int]:
    """Frames 0, stride, ..., (count - 1) stride of a video as (n, H, W, 3) uint8, n <= count, and the
    number of frames read (the video's length when n < count)."""
    frames, seen = [], 0
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        for seen, frame in enumerate(reader, 1):
            if (seen - 1) % stride == 0:
                frames.append(np.asarray(frame)[..., :3])
                if len(frames) == count:
                    break
    finally:
        reader.close()
    return (np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)), seen


def file_stamp(path: Path) -> list[int]:
    """Size and modification time of a file: whether a skipped video has been replaced since."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def decode_error(err: Exception) -> str:
    """One line for a video that the decoder refused: the reader's message and ffmpeg's last line."""
    lines = [re.sub(r"^\[[^]]*\]\s*", "", line.strip()) for line in str(err).splitlines()]
    lines = [line for line in lines if line and not line.startswith("===")]
    if not lines:
        return type(err).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} (ffmpeg: {lines[-1]})"


def read_item(item: CaptionedVideo, videos: Path, cfg: DictConfig) -> tuple[np.ndarray | None, dict | None]:
    """The frames of one listed video, or None and the record of why it is skipped."""
    if not item.caption.strip():
        return None, {"file": item.file, "caption": item.caption,
                      "reason": "empty caption: write one in the captions file"}
    path = videos / item.file
    stamp = file_stamp(path)
    record = {"file": item.file, "caption": item.caption, "stamp": stamp}
    if stamp[0] == 0:
        return None, record | {"reason": "empty file (0 bytes)"}
    try:
        raw, seen = read_frames(path, cfg.frames, cfg.frame_stride)
    except Exception as err:  # imageio raises OSError, RuntimeError, ... for what ffmpeg cannot decode
        return None, record | {"reason": f"not a readable video: {decode_error(err)}"}
    if len(raw) < cfg.frames:
        needed = (cfg.frames - 1) * cfg.frame_stride + 1
        reason = f"{seen} frames, {needed} needed (frames={cfg.frames}, frame_stride={cfg.frame_stride})"
        return None, record | {"reason": reason, "frames": seen, "needed": needed}
    return raw, None


def skip_reason(record: dict[str, Any]) -> str:
    """Why a video was skipped (shards written before reasons were recorded list only frame counts)."""
    return record.get("reason") or f"{record['frames']} frames, {record['needed']} needed"


def skip_summary(skipped: list[dict[str, Any]], limit: int = 20, sep: str = "; ") -> str:
    """'a.mp4: empty file (0 bytes); b.mp4: ...' for the first `limit` skipped videos."""
    shown = [f"{s['file']}: {skip_reason(s)}" for s in skipped[:limit]]
    return sep.join(shown + ([f"... ({len(skipped) - limit} more)"] if len(skipped) > limit else []))


def fit_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, height, width) in [-1, 1]: scaled (bilinear, antialiased) so that it
    covers height x width, then centre-cropped."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[..., top : top + height, left : left + width].permute(1, 0, 2, 3).contiguous()


def read_clip(path: str | Path, frames: int, height: int, width: int, stride: int = 1) -> torch.Tensor | None:
    """The clip of a video as the VAE takes it, (3, frames, height, width) in [-1, 1]; None when the
    video is too short."""
    raw, _ = read_frames(Path(path), frames, stride)
    return fit_frames(raw, height, width) if len(raw) == frames else None


# -- outputs -----------------------------------------------------------------------------------------
def write_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file under a temporary name, then rename it: a killed run leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def skipped_unchanged(skipped: list[dict[str, Any]], videos: Path) -> bool:
    """No skipped video has been replaced (or fixed) since it was skipped."""
    return all("stamp" not in s or ((videos / s["file"]).is_file() and file_stamp(videos / s["file"]) == s["stamp"])
               for s in skipped)


def shard_is_current(path: Path, items: list[CaptionedVideo], settings: str,
                     latent_shape: tuple[int, ...], text_shape: tuple[int, int], videos: Path) -> bool:
    """The shard exists, reads, was made with these settings and holds exactly `items` (minus skipped, which
    are unchanged since)."""
    try:
        header = read_shard_header(path)
    except (FileNotFoundError, ValueError):
        return False
    written = list(zip(header.files, header.captions)) + [(s["file"], s["caption"]) for s in header.skipped]
    return (header.metadata.get("settings") == settings and header.latent_shape == latent_shape
            and (header.text_length, header.text_dim) == text_shape
            and sorted(written) == [(i.file, i.caption) for i in items]
            and skipped_unchanged(header.skipped, videos))


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Encoders:
    """What turns clips and captions into stored tensors."""

    codec: WanVAECodec
    text: TextEncoder
    dtype: torch.dtype  # of the stored latents and text states

    def text_tensors(self, captions: list[str]) -> TextEmbedding:
        emb = self.text(captions)
        return TextEmbedding(emb.states.cpu().to(self.dtype), emb.mask.cpu().bool())


def encode_shard(items: list[CaptionedVideo], videos: Path, encoders: Encoders, cfg: DictConfig,
                 latent_shape: tuple[int, ...], progress: tqdm) -> tuple[dict[str, torch.Tensor], list[dict], list]:
    """Encode the clips of one shard in batches: (tensors, skipped videos, kept items)."""
    latents, states, masks, kept, skipped = [], [], [], [], []
    for batch in batched(items, cfg.batch_size):
        clips, batch_kept = [], []
        for item in batch:
            raw, record = read_item(item, videos, cfg)
            if record is not None:
                log.warning("skipped %s: %s", item.file, record["reason"])
                skipped.append(record)
            else:
                clips.append(fit_frames(raw, cfg.height, cfg.width))
                batch_kept.append(item)
        if clips:
            latents.append(encoders.codec.encode(torch.stack(clips)).cpu().to(encoders.dtype))
            text = encoders.text_tensors([item.caption for item in batch_kept])
            states.append(text.states)
            masks.append(text.mask)
            kept += batch_kept
        progress.update(len(batch))
    text_length, text_dim = encoders.text.max_length, encoders.text.dim
    tensors = {
        "latents": torch.cat(latents) if latents else torch.zeros(0, *latent_shape, dtype=encoders.dtype),
        "context": torch.cat(states) if states else torch.zeros(0, text_length, text_dim, dtype=encoders.dtype),
        "context_mask": torch.cat(masks) if masks else torch.zeros(0, text_length, dtype=torch.bool),
    }
    return tensors, skipped, kept


def prompts_are_current(path: Path, metadata: dict[str, str]) -> bool:
    try:
        _, written = read_header(path, PROMPT_TENSORS)
    except (FileNotFoundError, ValueError):
        return False
    return written == metadata


def write_prompts(path: Path, encoders: Encoders, negative_prompt: str, sample_prompts: list[str],
                  settings: str) -> None:
    """The negative prompt's and the sample prompts' embeddings (skipped when already written)."""
    metadata = {"negative_prompt": negative_prompt, "sample_prompts": json.dumps(sample_prompts, ensure_ascii=False),
                "settings": settings}
    if prompts_are_current(path, metadata):
        return
    negative = encoders.text_tensors([negative_prompt])
    sample = encoders.text_tensors(sample_prompts) if sample_prompts else TextEmbedding(
        negative.states[:0], negative.mask[:0])  # no sample prompts: empty tensors of the right width
    write_atomic({"negative_context": negative.states, "negative_mask": negative.mask,
                  "sample_context": sample.states, "sample_mask": sample.mask}, metadata, path)


# -- the run -----------------------------------------------------------------------------------------
REQUIRED = ("videos", "captions", "out", "model_path")


def check_settings(cfg: DictConfig) -> None:
    """Settings that cannot work, before any file is read."""
    missing = [key for key in REQUIRED if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: python -m lightning_tmd.data.preprocess videos=<folder> "
                         "captions=<file.csv|file.jsonl> out=<folder> model_path=<Wan diffusers folder>")
    if cfg.frames < 1 or (cfg.frames - 1) % FRAME_CHUNK:
        raise ValueError(f"frames={cfg.frames}: the Wan VAE needs 1 + 4k frames (e.g. 17, 33, 81)")
    for key in ("frame_stride", "shard_size", "batch_size", "height", "width"):
        if cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]} must be at least 1")
    if cfg.text.get("negative_prompt") is None:
        raise ValueError("text.negative_prompt is missing: set it (Wan's official one comes with text=umt5)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def text_encoder_config(cfg: DictConfig) -> dict[str, Any]:
    """`text.encoder`, with a transformers encoder loaded in the run's `dtype` (which keeps its fp32 modules)."""
    config = OmegaConf.to_container(cfg.text.encoder, resolve=True)
    if "dtype" in config:
        config["dtype"] = cfg.dtype
    return config


def build_text_encoder(config: dict[str, Any], device: torch.device) -> TextEncoder:
    """The text encoder of `config`, moved to `device` when it has weights."""
    encoder = instantiate(config)
    if any(True for _ in encoder.parameters()):  # encoders without weights compute on the CPU
        encoder.to(device)
    return encoder


def preprocess(cfg: DictConfig) -> dict[str, Any]:
    """Write the shards, the prompt embeddings and meta.json into `cfg.out`; returns the meta dict."""
    check_settings(cfg)
    items = read_captions(cfg.captions)
    videos, out = Path(cfg.videos).expanduser(), Path(cfg.out).expanduser()
    check_videos_exist(items, videos)
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
    codec = WanVAECodec.from_folder(cfg.model_path, cfg.dtype).to(device)
    latent_shape = codec.latent_shape(cfg.frames, cfg.height, cfg.width)
    text_config = text_encoder_config(cfg)
    encoders = Encoders(codec, build_text_encoder(text_config, device), dtype)
    settings = json.dumps({"frames": cfg.frames, "frame_stride": cfg.frame_stride, "height": cfg.height,
                           "width": cfg.width, "dtype": cfg.dtype, "text_encoder": text_config}, sort_keys=True)
    out.mkdir(parents=True, exist_ok=True)
    negative_prompt, sample_prompts = cfg.text.negative_prompt, list(dict.fromkeys(cfg.sample_prompts or []))
    write_prompts(out / PROMPTS_FILE, encoders, negative_prompt, sample_prompts, settings)

    text_shape = (encoders.text.max_length, encoders.text.dim)
    shards, skipped = [], []
    with tqdm(total=len(items), desc="clips", unit="clip") as progress:
        for index, shard_items in enumerate(batched(items, cfg.shard_size)):
            path = out / shard_name(index)
            if shard_is_current(path, shard_items, settings, latent_shape, text_shape, videos):
                log.info("%s: already written, kept", path.name)
                progress.update(len(shard_items))
            else:
                tensors, shard_skipped, kept = encode_shard(shard_items, videos, encoders, cfg, latent_shape, progress)
                metadata = {"files": json.dumps([i.file for i in kept], ensure_ascii=False),
                            "captions": json.dumps([i.caption for i in kept], ensure_ascii=False),
                            "skipped": json.dumps(shard_skipped, ensure_ascii=False), "settings": settings}
                write_atomic(tensors, metadata, path)
            header = read_shard_header(path)
            shards.append({"name": path.name, "clips": header.num_clips})
            skipped += header.skipped
    stale = sorted(p.name for p in out.glob("shard_*.safetensors") if p.name not in {s["name"] for s in shards})
    if stale:
        log.warning("%s holds shards that this run does not list (from an earlier run): %s", out, ", ".join(stale))
    if skipped:
        log.warning("skipped %d of %d videos (listed under \"skipped\" in %s): %s", len(skipped), len(items),
                    out / META_FILE, skip_summary(skipped))
    meta = {
        "latent_shape": list(latent_shape), "text_dim": encoders.text.dim, "text_max_length": encoders.text.max_length,
        "height": cfg.height, "width": cfg.width, "frames": cfg.frames, "frame_stride": cfg.frame_stride,
        "num_clips": sum(s["clips"] for s in shards), "num_shards": len(shards), "shard_size": cfg.shard_size,
        "shards": shards, "skipped": skipped, "dtype": cfg.dtype, "model_path": str(Path(cfg.model_path).resolve()),
        "videos": str(videos.resolve()), "captions": str(Path(cfg.captions).resolve()), "text_encoder": text_config,
        "negative_prompt": negative_prompt, "sample_prompts": sample_prompts,
    }
    write_json_atomic(meta, out / META_FILE)
    if not meta["num_clips"]:
        raise no_clips_error(skipped, videos, cfg, out / META_FILE)
    log.info("%d clips in %d shards written to %s", meta["num_clips"], len(shards), out)
    return meta


def no_clips_error(skipped: list[dict[str, Any]], videos: Path, cfg: DictConfig, meta: Path) -> ValueError:
    """Every listed video was skipped: too short for the clip settings, or unusable."""
    needed = (cfg.frames - 1) * cfg.frame_stride + 1
    if all("needed" in s for s in skipped):
        return ValueError(f"no video in '{videos}' has the {needed} frames that frames={cfg.frames}, "
                          f"frame_stride={cfg.frame_stride} need: lower them")
    return ValueError(f"videos: none of the {len(skipped)} videos listed for '{videos}' could be used: fix or "
                      f"replace them, then re-run (each reason is under \"skipped\" in {meta}):\n  "
                      + skip_summary(skipped, 10, "\n  "))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="preprocess")
def main(cfg: DictConfig) -> None:
    preprocess(cfg)


if __name__ == "__main__":
    main()
