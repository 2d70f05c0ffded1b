"""Latent preprocessing (videos + captions -> shards) and training on the shards (data=latents), with a
tiny Wan VAE and a tiny UMT5 that the tests build and save."""

import csv
import json
import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from conftest import CONF, compose_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_nets import save_tiny_umt5

from lightning_tmd.callbacks.samples import latent_preview, samples_as_video
from lightning_tmd.data.latents import LatentsDataModule
from lightning_tmd.data.preprocess import preprocess, read_captions, read_clip
from lightning_tmd.nets.codec import WanVAECodec
from lightning_tmd.nets.text import PretrainedTextEncoder

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [0.5, 2.0, 1.0, 1.5]
GOOD = ["a0.mp4", "a1.mp4", "a2.mp4", "a3.mp4"]
SHORT = "a1_short.mp4"  # sorts between a1 and a2: shards [a0, a1], [a1_short, a2], [a3]
CAPTIONS = {"a0.mp4": "a red square moving up", "a1.mp4": "a blue circle moving up",
            "a2.mp4": "a red circle and a blue square", SHORT: "a blue square", "a3.mp4": "a square moving up"}
CLIP = dict(frames=5, height=16, width=16, stride=2)  # 9 source frames of 20 x 24 each clip
LATENT_SHAPE = (4, 3, 8, 8)
SAMPLE_PROMPTS = ["a red circle", "a blue square moving up"]


def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[True], latents_mean=MEAN, latents_std=STD)


def moving_square(index: int, frames: int) -> list[np.ndarray]:
    colour = np.array([[255, 40, 40], [40, 40, 255], [40, 220, 40], [230, 230, 40]][index % 4], np.uint8)
    out = []
    for t in range(frames):
        frame = np.full((20, 24, 3), 30, np.uint8)
        frame[6 : 14, 4 + t : 12 + t] = colour
        out.append(frame)
    return out


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    """A 'Wan diffusers folder': vae/, text_encoder/, tokenizer/."""
    root = tmp_path_factory.mktemp("wan")
    tiny_vae().save_pretrained(root / "vae")
    save_tiny_umt5(root / "text_encoder")
    shutil.copytree(root / "text_encoder", root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[Path, Path]:
    """Four 9-frame videos, one 6-frame video, and a captions CSV."""
    folder = tmp_path_factory.mktemp("videos")
    for i, name in enumerate(GOOD):
        imageio.mimsave(folder / name, moving_square(i, 9), fps=8, macro_block_size=1)
    imageio.mimsave(folder / SHORT, moving_square(1, 6), fps=8, macro_block_size=1)
    captions = folder / "captions.csv"
    with captions.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for name in [SHORT, *reversed(GOOD)]:  # unsorted on purpose
            writer.writerow([name, CAPTIONS[name]])
    return folder, captions


def preprocess_cfg(wan_folder: Path, videos: Path, captions: Path, out: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("preprocess", overrides=[
            f"videos={videos}", f"captions={captions}", f"out={out}", f"model_path={wan_folder}", "text=umt5",
            "text.encoder.max_length=8", "text.dim=32", f"frames={CLIP['frames']}", f"height={CLIP['height']}",
            f"width={CLIP['width']}", f"frame_stride={CLIP['stride']}", "shard_size=2", "batch_size=2", "device=cpu",
            f"sample_prompts={json.dumps(SAMPLE_PROMPTS)}", *overrides])


@pytest.fixture(scope="module")
def shards(wan_folder, videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "out"
    preprocess(preprocess_cfg(wan_folder, *videos, out))
    GlobalHydra.instance().clear()
    return out


@pytest.fixture
def shards_copy(shards, tmp_path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "copy"))


def tensors(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()} | {"metadata": f.metadata()}


# -- codec -------------------------------------------------------------------------------------------
def test_codec_normalises_the_posterior_mode_and_inverts_it(wan_folder, tmp_path):
    codec = WanVAECodec.from_folder(wan_folder)  # the repository root: finds vae/
    vae = tiny_vae().eval()
    clip = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    latents = codec.encode(clip)
    assert latents.shape == (2, *LATENT_SHAPE) == (2, *codec.latent_shape(5, 16, 16))
    with torch.no_grad():
        z = vae.encode(clip).latent_dist.mode()
        mean, std = torch.tensor(MEAN).view(1, 4, 1, 1, 1), torch.tensor(STD).view(1, 4, 1, 1, 1)
        torch.testing.assert_close(latents, (z - mean) / std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(codec.decode(latents), vae.decode(z).sample.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert torch.equal(codec.encode(clip), latents)  # the mode: deterministic
    with pytest.raises(ValueError, match="frames=6.*1 \\+ 4k"):
        codec.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(FileNotFoundError, match="model_path.*does not exist"):
        WanVAECodec.from_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        WanVAECodec.from_folder(tmp_path)
    shutil.copy(wan_folder / "vae" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="has no VAE weights"):
        WanVAECodec.from_folder(tmp_path)


def test_read_clip_covers_and_centre_crops(videos):
    folder, captions = videos
    clip = read_clip(folder / "a0.mp4", **CLIP)
    assert clip.shape == (3, 5, 16, 16) and clip.min() >= -1 and clip.max() <= 1
    # the red square moves right 1 source px per frame: 2 per stride-2 frame, 1.6 after scaling by 0.8
    red = (clip[0] > 0.3) & (clip[2] < -0.3)
    xs = [torch.nonzero(red[t])[:, 1].float().mean().item() for t in range(5)]
    assert np.allclose(np.diff(xs), 1.6, atol=0.5), xs
    assert read_clip(folder / SHORT, **CLIP) is None
    assert [i.file for i in read_captions(captions)] == sorted(CAPTIONS)


# -- preprocessing -----------------------------------------------------------------------------------
def test_shards_equal_a_direct_encoding(shards, wan_folder, videos):
    folder, _ = videos
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["latent_shape"] == list(LATENT_SHAPE) and meta["text_dim"] == 32 and meta["text_max_length"] == 8
    assert (meta["num_clips"], meta["num_shards"], meta["frames"], meta["frame_stride"]) == (4, 3, 5, 2)
    assert [s["clips"] for s in meta["shards"]] == [2, 1, 1]
    assert [s["file"] for s in meta["skipped"]] == [SHORT] and meta["skipped"][0]["frames"] == 6

    codec = WanVAECodec.from_folder(wan_folder)
    text = PretrainedTextEncoder(str(wan_folder / "text_encoder"), max_length=8)
    files = []
    for entry in meta["shards"]:
        shard = tensors(shards / entry["name"])
        names, captions = json.loads(shard["metadata"]["files"]), json.loads(shard["metadata"]["captions"])
        assert captions == [CAPTIONS[n] for n in names]
        direct = codec.encode(torch.stack([read_clip(folder / n, **CLIP) for n in names]))
        torch.testing.assert_close(shard["latents"], direct, atol=1e-5, rtol=1e-5)  # batched vs. direct encode
        embedded = text(captions)
        torch.testing.assert_close(shard["context"], embedded.states, atol=1e-6, rtol=1e-6)
        assert torch.equal(shard["context_mask"], embedded.mask) and shard["context_mask"].dtype == torch.bool
        files += names
    assert files == GOOD
    assert json.loads(tensors(shards / "shard_00001.safetensors")["metadata"]["skipped"])[0]["file"] == SHORT
    prompts = tensors(shards / "prompts.safetensors")
    assert json.loads(prompts["metadata"]["sample_prompts"]) == SAMPLE_PROMPTS
    torch.testing.assert_close(prompts["sample_context"], text(SAMPLE_PROMPTS).states, atol=1e-6, rtol=1e-6)
    assert prompts["negative_context"].shape == (1, 8, 32)


def test_rerun_rewrites_only_the_missing_shard(shards_copy, wan_folder, videos, monkeypatch):
    encoded, embedded = [], []
    encode, embed = WanVAECodec.encode, PretrainedTextEncoder.forward
    monkeypatch.setattr(WanVAECodec, "encode", lambda self, v: encoded.append(len(v)) or encode(self, v))
    monkeypatch.setattr(PretrainedTextEncoder, "forward", lambda self, c: embedded.extend(c) or embed(self, c))
    before = {p.name: (p.stat().st_mtime_ns, tensors(p)) for p in shards_copy.glob("shard_*.safetensors")}
    (shards_copy / "shard_00001.safetensors").unlink()

    preprocess(preprocess_cfg(wan_folder, *videos, shards_copy))
    assert encoded == [1] and embedded == [CAPTIONS["a2.mp4"]]  # a2 only: a1_short is skipped unread by the VAE
    for name in ("shard_00000.safetensors", "shard_00002.safetensors", "prompts.safetensors"):
        path = shards_copy / name
        assert name not in before or path.stat().st_mtime_ns == before[name][0]
    rewritten = tensors(shards_copy / "shard_00001.safetensors")
    assert torch.equal(rewritten["latents"], before["shard_00001.safetensors"][1]["latents"])
    assert json.loads((shards_copy / "meta.json").read_text())["num_clips"] == 4
    assert not list(shards_copy.glob("*.tmp"))


def test_missing_video_fails_before_encoding(wan_folder, videos, tmp_path, monkeypatch):
    folder, captions = videos
    bad = tmp_path / "captions.jsonl"
    rows = [{"file": "a0.mp4", "caption": "a red square"}, {"file": "gone/missing.mp4", "caption": "a blue circle"}]
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(WanVAECodec, "from_folder", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(FileNotFoundError, match="gone/missing.mp4"):
        preprocess(preprocess_cfg(wan_folder, folder, bad, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="frames=6: the Wan VAE needs 1 \\+ 4k"):
        preprocess(preprocess_cfg(wan_folder, folder, captions, tmp_path / "out", "frames=6"))
    bad.write_text(json.dumps({"path": "a0.mp4", "caption": "x"}))
    with pytest.raises(ValueError, match="entry 1 .* lacks \\['file'\\]"):
        preprocess(preprocess_cfg(wan_folder, folder, bad, tmp_path / "out"))
    unset = preprocess_cfg(wan_folder, folder, captions, tmp_path / "out")
    unset.videos = "???"
    with pytest.raises(ValueError, match="videos not set: python -m lightning_tmd.data.preprocess videos=<folder>"):
        preprocess(unset)


def test_no_video_long_enough_is_an_error(wan_folder, videos, tmp_path):
    with pytest.raises(ValueError, match="has the 17 frames that frames=9, frame_stride=2 need"):
        preprocess(preprocess_cfg(wan_folder, *videos, tmp_path / "out", "frames=9"))
    assert len(json.loads((tmp_path / "out" / "meta.json").read_text())["skipped"]) == 5



def write_captions(path: Path, captions: dict[str, str]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        writer.writerows(captions.items())
    return path


def bad_videos(folder: Path, good: Path) -> dict[str, str]:
    """An empty file, a text file and a truncated video, all named .mp4; their captions."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "b_empty.mp4").write_bytes(b"")
    (folder / "b_text.mp4").write_text("not a video\n")
    data = good.read_bytes()
    (folder / "b_truncated.mp4").write_bytes(data[: len(data) // 2])
    return {"b_empty.mp4": "a red circle", "b_text.mp4": "a blue circle", "b_truncated.mp4": "a blue square"}


def test_unusable_videos_are_skipped_listed_and_picked_up_once_replaced(wan_folder, videos, tmp_path, monkeypatch,
                                                                         caplog):
    source, _ = videos
    folder = tmp_path / "videos"
    captions = bad_videos(folder, source / "a1.mp4") | {"a0.mp4": CAPTIONS["a0.mp4"], "a2.mp4": CAPTIONS["a2.mp4"],
                                                       "a3.mp4": ""}  # a3: no caption
    for name in ("a0.mp4", "a2.mp4", "a3.mp4"):
        shutil.copy(source / name, folder / name)
    csv_path = write_captions(tmp_path / "captions.csv", captions)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="lightning_tmd.data.preprocess"):
        meta = preprocess(preprocess_cfg(wan_folder, folder, csv_path, out))
    assert meta["num_clips"] == 2 and meta == json.loads((out / "meta.json").read_text())
    files = [f for s in meta["shards"] for f in json.loads(tensors(out / s["name"])["metadata"]["files"])]
    assert files == ["a0.mp4", "a2.mp4"]
    reasons = {s["file"]: s["reason"] for s in meta["skipped"]}
    assert reasons["a3.mp4"] == "empty caption: write one in the captions file"
    assert reasons["b_empty.mp4"] == "empty file (0 bytes)"
    assert reasons["b_text.mp4"].startswith("not a readable video: ")
    assert reasons["b_truncated.mp4"].startswith("not a readable video: ")
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped 4 of 6 videos")]
    assert len(summary) == 1 and "b_empty.mp4: empty file (0 bytes); b_text.mp4: not a readable video" in summary[0]

    encoded = []
    encode = WanVAECodec.encode
    monkeypatch.setattr(WanVAECodec, "encode", lambda self, v: encoded.append(len(v)) or encode(self, v))
    preprocess(preprocess_cfg(wan_folder, folder, csv_path, out))
    assert encoded == []  # nothing changed: every shard kept
    shutil.copy(source / "a1.mp4", folder / "b_truncated.mp4")  # the truncated video replaced by a whole one
    meta = preprocess(preprocess_cfg(wan_folder, folder, csv_path, out))
    assert encoded == [1] and meta["num_clips"] == 3
    assert sorted(s["file"] for s in meta["skipped"]) == ["a3.mp4", "b_empty.mp4", "b_text.mp4"]


def unusable_videos(folder: Path) -> tuple[Path, Path]:
    """A videos folder of three unusable videos (empty, text, truncated) and its captions CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(folder / "whole.mp4", moving_square(0, 9), fps=8, macro_block_size=1)
    captions = bad_videos(folder / "videos", folder / "whole.mp4")
    return folder / "videos", write_captions(folder / "captions.csv", captions)


def test_only_unusable_videos_is_an_error_naming_the_folder(wan_folder, tmp_path):
    folder, csv_path = unusable_videos(tmp_path)
    with pytest.raises(ValueError, match=f"videos: none of the 3 videos listed for '{folder}' could be used: fix or "
                                         "replace them, then re-run .*:\n  b_empty.mp4: empty file \\(0 bytes\\)\n"
                                         "  b_text.mp4: not a readable video: "):
        preprocess(preprocess_cfg(wan_folder, folder, csv_path, tmp_path / "out"))
    assert len(json.loads((tmp_path / "out" / "meta.json").read_text())["skipped"]) == 3


# -- the DataModule ----------------------------------------------------------------------------------
def test_datamodule_batches_splits_and_prompts(shards):
    dm = LatentsDataModule(str(shards), num_val=1, batch_size=2, expected_latent_shape=list(LATENT_SHAPE),
                           expected_text_dim=32)
    assert dm.clip_shape == LATENT_SHAPE and len(dm.train_set) == 3 and len(dm.val_set) == 1
    train_captions = {dm.train_set[i]["caption"] for i in range(3)}
    assert dm.val_set[0]["caption"] == CAPTIONS["a3.mp4"] and CAPTIONS["a3.mp4"] not in train_captions
    loader = dm.train_dataloader()
    batches = [dm.on_before_batch_transfer(b, 0) for b in loader]
    assert len(batches) == 1  # 3 clips, batch 2, drop_last
    batch = batches[0]
    assert batch["video"].shape == (2, *LATENT_SHAPE) and batch["video"].dtype == torch.float32
    assert batch["context"].shape == batch["negative_context"].shape == (2, 8, 32)
    assert batch["context_mask"].shape == batch["negative_mask"].shape == (2, 8)
    assert len(batch["caption"]) == 2 and set(batch["caption"]) <= train_captions
    shard = tensors(shards / "shard_00000.safetensors")
    item = dm.train_set[1]
    assert torch.equal(item["video"], shard["latents"][1]) and torch.equal(item["context"], shard["context"][1])
    assert dm.sample_prompts == SAMPLE_PROMPTS
    emb = dm.prompts(["a blue square moving up", "a red circle"])
    torch.testing.assert_close(emb.states[1], tensors(shards / "prompts.safetensors")["sample_context"][0])
    assert dm.prompts.dim == 32 and dm.prompts.negative(3).states.shape == (3, 8, 32)
    with pytest.raises(KeyError, match="not preprocessed.*sample_prompts"):
        dm.prompts(["a green triangle"])
    assert loader.state_dict() == {"epoch": 1, "batches_done": 0}  # the resumable loader
    with pytest.raises(ValueError, match="data.num_val=4 leaves no training clips"):
        LatentsDataModule(str(shards), num_val=4)


def test_decode_and_sample_videos(shards, wan_folder):
    latents = torch.randn(2, *LATENT_SHAPE)
    preview = samples_as_video(latents, LatentsDataModule(str(shards), num_val=1), torch.device("cpu"))
    assert torch.equal(preview, latent_preview(latents)) and preview.shape == (2, 3, 3, 8, 8)
    torch.testing.assert_close(preview, (latents[:, :3] / 3).clamp(-1, 1))
    dm = LatentsDataModule(str(shards), num_val=1, vae_path=str(wan_folder), decode_batch_size=1)
    video = samples_as_video(latents, dm, torch.device("cpu"))
    assert video.shape == (2, 3, 5, 16, 16)
    torch.testing.assert_close(video, WanVAECodec.from_folder(wan_folder).decode(latents), atol=1e-5, rtol=1e-5)


def test_truncated_or_incomplete_shard_is_named(shards_copy):
    path = shards_copy / "shard_00001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="shard_00001.safetensors: unreadable or truncated"):
        LatentsDataModule(str(shards_copy), num_val=1)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="shard_00001.safetensors: missing"):
        LatentsDataModule(str(shards_copy), num_val=1)
    shard = tensors(shards_copy / "shard_00000.safetensors")
    metadata = shard.pop("metadata")
    save_file({"latents": shard["latents"], "context": shard["context"]}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="shard_00001.safetensors: tensor\\(s\\) context_mask missing"):
        LatentsDataModule(str(shards_copy), num_val=1)


def test_wrong_latent_shape_or_text_width_is_named(shards, shards_copy):
    shape_error = "shard_00000.safetensors: latent shape \\(4, 3, 8, 8\\).*expected_latent_shape"
    with pytest.raises(ValueError, match=shape_error):
        LatentsDataModule(str(shards), num_val=1, expected_latent_shape=[4, 3, 4, 4])
    with pytest.raises(ValueError, match="shard_00000.safetensors: text width 32 .*expects 16.*expected_text_dim"):
        LatentsDataModule(str(shards), num_val=1, expected_text_dim=16)
    path = shards_copy / "shard_00002.safetensors"
    shard = tensors(path)
    metadata = shard.pop("metadata")
    save_file({**shard, "latents": shard["latents"][..., :4, :4].contiguous()}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="shard_00002.safetensors: latent shape .* differs .* meta.json"):
        LatentsDataModule(str(shards_copy), num_val=1)
    save_file({**shard, "context": shard["context"][..., :16].contiguous()}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="shard_00002.safetensors: text width 16 differs .* meta.json"):
        LatentsDataModule(str(shards_copy), num_val=1)


# -- training ----------------------------------------------------------------------------------------
def latents_run(shards: Path, out: Path, *overrides: str):
    return compose_train(["stage=teacher", "model=wan_smoke", "data=latents", f"data.path={shards}",
                          "data.num_val=1", "data.batch_size=2", "text=umt5", "text.dim=32",
                          "model.config.in_channels=4", "model.config.out_channels=4",
                          "model.config.patch_size=[1,2,2]", "stage.module.sample_steps=2", *overrides], out)


def test_teacher_fast_dev_run_on_latents(shards, wan_folder, tmp_path):
    from lightning_tmd.train import train

    metrics = train(latents_run(shards, tmp_path, "trainer.fast_dev_run=true", f"data.vae_path={wan_folder}"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    gifs = list(tmp_path.rglob("samples/*.gif"))
    assert len(gifs) == 1
    frames = imageio.mimread(gifs[0])
    assert len(frames) == 5  # decoded: 5 video frames, not the 3 latent frames


@pytest.mark.parametrize(("override", "message"), [
    ("model.config.in_channels=3", "model.config.in_channels=3 but the latents .* have 4 channels"),
    ("model.config.patch_size=[1,3,3]", "patch_size=\\[1, 3, 3\\] does not divide the latent grid \\[3, 8, 8\\]"),
])
def test_model_that_does_not_fit_the_latents_fails_before_training(shards, tmp_path, override, message):
    from lightning_tmd.train import train

    with pytest.raises(ValueError, match=message):
        train(latents_run(shards, tmp_path, override))


# -- the Wan2.1 experiments on a tiny Wan folder -------------------------------------------------------
TINY_WAN_OVERRIDES = [
    "model.paper.head_blocks=1", "model.paper.tm_iterations=1", "model.paper.dmd_iterations=1",
    "model.paper.discriminator_blocks=[1,2]", "model.paper.discriminator_widths=[8,16,16]",
    "trainer.accelerator=cpu", "trainer.precision=32-true",
    "strategy=auto", "trainer.fast_dev_run=true", "data.num_val=1", "data.batch_size=2", "text.dim=32",
    "text.encoder.max_length=8",
]


@pytest.fixture(scope="module")
def tiny_wan_folder(wan_folder, tmp_path_factory) -> Path:
    """The Wan folder with a 3-block transformer/ for 4-channel latents and 32-wide text."""
    from lightning_tmd.nets.wan import WanNet

    root = Path(shutil.copytree(wan_folder, tmp_path_factory.mktemp("tiny_wan") / "Wan2.1-T2V-tiny-Diffusers"))
    WanNet.from_config(dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                            out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=3)
                       ).save_pretrained(root / "transformer")
    return root


def test_wan_experiments_compose_the_paper_settings(tmp_path):
    small = compose_train(["experiment=wan_tmd", "model.path=/wan", "data.path=/shards",
                           "stage.module.student_ckpt=s.ckpt"], tmp_path)
    assert small.stage.module.student.head_blocks == 5 and small.stage.module.student.inner_steps == 2
    assert list(small.stage.module.critic.discriminator.blocks) == [16, 23, 30]  # the paper's 0-based 15, 22, 29
    assert small.stage.module.student.optim.lr == small.stage.module.critic.optim.lr == 1e-5
    assert small.trainer.strategy._target_.endswith("DDPStrategy") and small.trainer.max_steps == 4000
    large = compose_train(["experiment=wan_tmd_stage1", "model=wan2.1_t2v_14b", "strategy=fsdp", "model.path=/wan",
                           "data.path=/shards"], tmp_path)
    assert large.stage.module.inner_steps == 4 and large.stage.module.norm_constant == 1e-5
    assert large.stage.module.optim.lr == 1e-5 and large.trainer.strategy._target_.endswith("FSDP2Strategy")
    dmd2v = compose_train(["experiment=wan_dmd2v", "model=wan2.1_t2v_14b", "model.path=/wan", "data.path=/s"], tmp_path)
    assert dmd2v.stage.module.student.kind == "one_pass"
    assert list(dmd2v.stage.module.critic.discriminator.blocks) == [20, 30, 40]


def test_wan_folder_errors_name_the_field_and_the_missing_file(tmp_path):
    from lightning_tmd.train import train

    with pytest.raises(ValueError, match="model.path is required"):
        train(compose_train(["experiment=wan_tmd_stage1", "data.path=/shards"], tmp_path))
    (tmp_path / "wan").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        train(compose_train(["experiment=wan_tmd_stage1", f"model.path={tmp_path / 'wan'}", "data.path=/s"], tmp_path))


KD_PAIRS = ["data.num_pairs=2", "data.num_val_pairs=1", "data.steps=2", "data.generate_batch_size=2",
            "model.paper.kd_iterations=2"]


@pytest.mark.parametrize(("warm_start", "stage2", "meta_init"), [
    (["experiment=wan_tmd_stage1"], "wan_tmd", False),  # TMD: stage 1, then stage 2
    # one-step DMD2-v: KD pairs and warm-up, then DMD2-v; every net built empty and read from the folder
    (["experiment=wan_kd", *KD_PAIRS], "wan_dmd2v_1step", True),
])
def test_wan_warm_start_then_stage2_run_on_a_tiny_wan_folder(warm_start, stage2, meta_init, tiny_wan_folder, shards,
                                                             tmp_path):
    from lightning_tmd.train import train

    common = [f"model.path={tiny_wan_folder}", f"data.path={shards}", f"model.meta_init={meta_init}",
              *TINY_WAN_OVERRIDES]
    extra = [f"data.cache_dir={tmp_path / 'pairs'}"] if "experiment=wan_kd" in warm_start else []
    first = train(compose_train([*warm_start, *common, *extra, "trainer.fast_dev_run=false",
                                 "callbacks.samples.every_n_steps=0"], tmp_path / "first"))
    assert first and all(torch.isfinite(torch.tensor(value)) for value in first.values())
    student = tmp_path / "first" / "checkpoints" / "last.ckpt"
    second = train(compose_train([f"experiment={stage2}", *common, f"stage.module.student_ckpt={student}",
                                  "stage.module.teacher_dtype=null", "stage.module.critic.discriminator.mlp_width=8"],
                                 tmp_path / "dmd"))
    assert torch.isfinite(torch.tensor(second["train/vsd"]))
    gifs = list((tmp_path / "dmd").rglob("samples/*.gif"))
    assert len(gifs) == 1 and len(imageio.mimread(gifs[0])) == 5  # decoded by the folder's VAE
    if meta_init:  # sampling builds the nets whole and reads the checkpoint's weights, not the folder's
        from lightning_tmd.checkpoints import sampling_weights
        from lightning_tmd.generators import load_generator

        loaded = load_generator(tmp_path / "dmd" / "checkpoints" / "last.ckpt")
        saved = sampling_weights(torch.load(tmp_path / "dmd" / "checkpoints" / "last.ckpt")["state_dict"], "student.")
        assert all(torch.equal(v, saved[k]) for k, v in loaded.module.student.sampling_net().state_dict().items())


# -- KD pairs on latents (the one-step DMD2-v baseline on Wan) ------------------------------------------------
def latent_pairs(tiny_wan_folder: Path, shards: Path, cache: Path):
    from lightning_tmd.teacher_pairs import LatentTeacherPairsDataModule

    model = {"path": str(tiny_wan_folder), "config": None, "dtype": "float32", "checkpoint_blocks": False}
    return LatentTeacherPairsDataModule(str(shards), model, num_pairs=3, num_val_pairs=1, steps=2,
                                        generate_batch_size=2, cache_dir=str(cache), num_val=1, batch_size=2)


def chunk_files(module) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(path) for path in sorted(module.cache_folder().iterdir())}


def test_latent_kd_pairs_are_the_teachers_samples_split_by_process_and_resumed(tiny_wan_folder, shards, tmp_path):
    from lightning_tmd.modules.teacher import TeacherModule

    whole = latent_pairs(tiny_wan_folder, shards, tmp_path / "one")
    assert whole.generate_share() == 3  # train: pairs 0-1 and 2, val: pair 0
    files = chunk_files(whole)
    assert list(files) == ["train_00000.safetensors", "train_00001.safetensors", "val_00000.safetensors"]
    # two processes write disjoint shares whose union is the one-process result, bit for bit
    split = latent_pairs(tiny_wan_folder, shards, tmp_path / "two")
    assert split.generate_share(0, 2) == 2 and split.generate_share(1, 2) == 1
    assert all(torch.equal(a[name], b[name]) for a, b in zip(files.values(), chunk_files(split).values())
               for name in ("noise", "video"))
    # the pairs are the Wan teacher's CFG samples (the paper's 5) from the clips' stored caption embeddings
    teacher = TeacherModule(whole.model, ema_decay=None).eval()
    batch = [whole.train_set[i] for i in (0, 1)]
    context = torch.stack([item["context"] for item in batch])
    noise = files["train_00000.safetensors"]["noise"]
    expected, _ = teacher.sample(context, whole.prompts.negative(2).states, noise=noise, steps=2, guidance_scale=5.0,
                                 shift=5.0)
    torch.testing.assert_close(files["train_00000.safetensors"]["video"], expected)
    # a restarted generation writes only the missing and the truncated chunk
    folder = whole.cache_folder()
    (folder / "train_00001.safetensors").unlink()
    (folder / "val_00000.safetensors").write_bytes(b"truncated")
    kept = (folder / "train_00000.safetensors").stat().st_mtime_ns
    assert whole.generate_share() == 2 and (folder / "train_00000.safetensors").stat().st_mtime_ns == kept
    whole.setup("fit")
    loader = whole.train_dataloader()
    (batch,) = [whole.on_before_batch_transfer(b, 0) for b in loader]  # 3 pairs, batch 2, drop_last
    assert batch["video"].shape == batch["noise"].shape == (2, *LATENT_SHAPE)
    assert {"context", "context_mask", "negative_context", "caption"} <= set(batch)

