"""Export folders and TMDPipeline: every student kind exports its sampling weights, the pipeline samples
exactly what the checkpoint samples (fp32: bit-equal on CPU), the sample app takes the folder, the text
encoder and the VAE travel with the export, and bad inputs fail with errors that name the fix."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CONF, compose_train
from diffusers import AutoencoderKLWan
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open

from lightning_tmd.checkpoints import sampling_state_dict
from lightning_tmd.diffusers_pipeline import TMDPipeline
from lightning_tmd.export import export
from lightning_tmd.generators import load_generator
from lightning_tmd.nets.text import PretrainedTextEncoder
from lightning_tmd.sample import sample
from lightning_tmd.sampling import effective_nfe, seeded_noise

PROMPTS = ["a red circle moving up", "a blue square moving left"]
SMOKE_TEXT = ["text=vocab", "text.encoder.dim=16", "text.encoder.max_length=16"]


def compose_app(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def export_to(ckpt: Path, out: Path, *overrides: str) -> Path:
    return export(compose_app("export", [f"ckpt={ckpt}", f"out={out}", *overrides]))


def pipeline_weights(pipe: TMDPipeline) -> dict[str, torch.Tensor]:
    return {k[len("net."):]: v for k, v in pipe.student.state_dict().items() if k.startswith("net.")}


@pytest.fixture(scope="module")
def stage1(smoke_student_checkpoint, tmp_path_factory):
    """The smoke stage-1 student, exported once: (checkpoint, folder, pipeline, loaded checkpoint)."""
    out = export_to(smoke_student_checkpoint, tmp_path_factory.mktemp("export") / "smoke_tm")
    pipe = TMDPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return smoke_student_checkpoint, out, pipe, load_generator(smoke_student_checkpoint)


def test_stage1_folder_holds_the_sampling_weights_and_settings(stage1):
    ckpt, out, pipe, loaded = stage1
    assert (out / "model_index.json").is_file() and (out / "run_config.yaml").is_file()
    assert not (out / "text_encoder").exists() and not (out / "vae").exists()  # vocab text, pixel space
    config = pipe.student.config
    assert (config.kind, config.head_blocks, config.outer_steps, config.inner_steps) == ("tmd", 1, 2, 2)
    assert (config.outer_shift, config.inner_shift, config.t_max, config.fusion) == (10.0, 10.0, 0.999, "gated")
    assert list(config.sample_shape) == [3, 4, 16, 16] and config.text["kind"] == "vocab"
    expected = sampling_state_dict(str(ckpt))
    weights = pipeline_weights(pipe)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    negative = loaded.prompts.negative(1).states[0]
    assert torch.equal(pipe.student.negative_prompt_embeds, negative)
    assert pipe.embed_prompts([pipe.negative_prompt]).states[0].equal(negative)


def imported_packages(module: str) -> set[str]:
    """The outside packages `module` imports, following its imports of this project (and their parents)."""
    seen, todo, outside = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]
        for node in ast.walk(ast.parse(Path(importlib.util.find_spec(name).origin).read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            todo += [n for n in names if n.startswith("lightning_tmd")]
            outside |= {n.split(".")[0] for n in names if not n.startswith("lightning_tmd")}
    return outside


def test_the_pipeline_needs_neither_lightning_nor_hydra():
    packages = imported_packages("lightning_tmd.diffusers_pipeline")
    assert {"torch", "diffusers"} <= packages
    assert not packages & {"lightning", "hydra", "omegaconf"}
    assert {"lightning", "hydra"} <= imported_packages("lightning_tmd.export")  # the check sees them


def test_pipeline_samples_what_the_checkpoint_samples(stage1):
    _, _, pipe, loaded = stage1
    context = loaded.prompts(PROMPTS).states
    noise = seeded_noise([3, 4], loaded.clip_shape)
    for steps in ({}, {"outer_steps": 1, "inner_steps": 4}, {"outer_steps": 3, "inner_steps": 1}):
        clips, nfe = loaded.module.sample(context, noise=noise, **steps)
        out = pipe(prompt=PROMPTS, latents=noise, output_type="latent", **steps)
        torch.testing.assert_close(out.frames, clips, atol=1e-6, rtol=0)  # fp32 on CPU: in fact bit-equal
        assert out.nfe == nfe == loaded.module.effective_nfe(steps.get("outer_steps"), steps.get("inner_steps"))
    assert out.nfe == effective_nfe(3, 1, 1, 2) == 3.0
    # one generator draws the starting noise and then the inner noise, as StudentModule.sample does
    clips, _ = loaded.module.sample(context, shape=loaded.clip_shape, generator=torch.Generator().manual_seed(7))
    out = pipe(prompt_embeds=context, generator=torch.Generator().manual_seed(7), output_type="latent")
    torch.testing.assert_close(out.frames, clips, atol=1e-6, rtol=0)


def test_call_time_steps_change_the_sampler_and_outputs_are_frames(stage1):
    _, _, pipe, _ = stage1
    noise = seeded_noise([0], (3, 4, 16, 16))
    default = pipe(prompt=PROMPTS[0], latents=noise, output_type="latent")
    more_inner = pipe(prompt=PROMPTS[0], latents=noise, inner_steps=4, output_type="latent")
    one_step = pipe(prompt=PROMPTS[0], latents=noise, outer_steps=1, output_type="latent")
    assert default.nfe == effective_nfe(2, 2, 1, 2) == 3.0 and more_inner.nfe == 5.0 and one_step.nfe == 1.5
    assert (default.frames - more_inner.frames).abs().max() > 1e-3
    assert (default.frames - one_step.frames).abs().max() > 1e-3
    frames = pipe(prompt=PROMPTS[0], latents=noise, output_type="pt").frames  # (B, T, C, H, W) in [0, 1]
    torch.testing.assert_close(frames, ((default.frames + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4), atol=1e-6,
                               rtol=0)
    array, nfe = pipe(prompt=PROMPTS[0], latents=noise, output_type="np", return_dict=False)
    assert isinstance(array, np.ndarray) and array.shape == (1, 4, 16, 16, 3) and nfe == 3.0
    many = pipe(prompt=PROMPTS, num_videos_per_prompt=3, generator=torch.Generator().manual_seed(0))
    assert many.frames.shape == (6, 4, 3, 16, 16)


def test_sample_app_on_the_folder_equals_the_app_on_the_checkpoint(stage1, tmp_path):
    ckpt, out, pipe, _ = stage1
    common = ["seeds=[3,4]", f"prompts=[{','.join(PROMPTS)}]", "+sampler.outer_steps=2", "+sampler.inner_steps=3"]
    from_ckpt = sample(compose_app("sample", [f"ckpt={ckpt}", f"out_dir={tmp_path / 'ckpt'}", *common]))
    from_folder = sample(compose_app("sample", [f"ckpt={out}", f"out_dir={tmp_path / 'folder'}", *common]))
    assert torch.equal(from_folder["videos"], from_ckpt["videos"]) and from_folder["nfe"] == from_ckpt["nfe"] == 4.0
    names = {folder: sorted(p.name for p in (tmp_path / folder).iterdir()) for folder in ("ckpt", "folder")}
    assert names["folder"] == names["ckpt"] and "grid.png" in names["ckpt"]
    # and the pipeline with one generator per (prompt, seed) pair gives the app's clips
    generators = [torch.Generator().manual_seed(s) for s in (3, 4, 3, 4)]
    frames = pipe(prompt=[PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, generator=generators, outer_steps=2, inner_steps=3,
                  output_type="np").frames
    assert np.array_equal((frames * 255).round().astype(np.uint8), from_ckpt["videos"].numpy())


def save_checkpoint(module: L.LightningModule, cfg, path: Path) -> Path:
    """A checkpoint as training writes it (weights, hyper-parameters, run config), without training."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__, "run_config": OmegaConf.to_container(cfg, resolve=True)},
               path)
    return path


def perturb(module, seed: int) -> None:
    """Move the weights off their initialisation, and the EMA (when kept) elsewhere than the raw weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in [module.net] + ([module.ema.module] if module.ema is not None else []):
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))


STUDENT_RUNS = {
    "dmd_tmd": ["experiment=shapes_smoke_dmd"],
    "dmd_one_pass": ["experiment=shapes_smoke_dmd", "stage/student@stage.module.student=one_pass",
                     "~stage.module.student.head_blocks"],
    "kd": ["experiment=shapes_kd", "model=wan_smoke", "data=shapes_smoke", *SMOKE_TEXT],
}


@pytest.mark.parametrize(("run", "kind", "ema"), [("dmd_tmd", "tmd", True), ("dmd_one_pass", "one_pass", True),
                                                  ("kd", "one_pass", False)])
def test_stage2_and_kd_students_export_their_sampling_weights(run, kind, ema, tmp_path):
    cfg = compose_train([*STUDENT_RUNS[run], "stage.module.teacher_ckpt=null"], tmp_path / "run")
    module = instantiate(cfg.stage.module, _convert_="all")
    student = module.student if run.startswith("dmd") else module
    perturb(student, 0)
    assert (student.ema is not None) == ema
    out = export_to(save_checkpoint(module, cfg, tmp_path / "student.ckpt"), tmp_path / "export")
    pipe = TMDPipeline.from_pretrained(out)
    assert pipe.student.config.kind == kind
    expected = student.sampling_net().state_dict()
    weights = pipeline_weights(pipe)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    if ema:  # the EMA, not the raw weights
        assert any(not torch.equal(weights[k], v) for k, v in student.net.state_dict().items())
    loaded = load_generator(tmp_path / "student.ckpt")
    context, noise = loaded.prompts(PROMPTS).states, seeded_noise([0, 1], loaded.clip_shape)
    clips, nfe = loaded.module.sample(context, noise=noise, outer_steps=2, inner_steps=3)
    out = pipe(prompt=PROMPTS, latents=noise, outer_steps=2, inner_steps=3, output_type="latent")
    torch.testing.assert_close(out.frames, clips, atol=1e-6, rtol=0)
    assert out.nfe == nfe == (effective_nfe(2, 3, 1, 2) if kind == "tmd" else 2.0)


def test_bfloat16_export_keeps_wan_fp32_modules_and_samples_close(stage1, tmp_path):
    ckpt, _, pipe, _ = stage1
    out = export_to(ckpt, tmp_path / "bf16", "dtype=bfloat16")
    with safe_open(str(out / "student" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["net.wan.transformer.patch_embedding.weight"] == "BF16"
    assert dtypes["net.fusion.mlp.0.weight"] == "BF16"
    assert dtypes["net.wan.transformer.scale_shift_table"] == "F32"
    assert dtypes["net.wan.transformer.condition_embedder.time_embedder.linear_1.weight"] == "F32"
    assert dtypes["negative_prompt_embeds"] == "F32"
    half = TMDPipeline.from_pretrained(out, dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.student.compute_dtype == torch.bfloat16
    noise = seeded_noise([0, 1], (3, 4, 16, 16))
    full = pipe(prompt=PROMPTS, latents=noise, output_type="latent").frames
    low = half(prompt=PROMPTS, latents=noise, output_type="latent").frames
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.1, rtol=0)  # bf16 weights and activations


def save_tiny_umt5(folder: Path, width: int) -> None:
    """A tiny UMT5 encoder with a word-level tokenizer, built from configs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "up", "left", "blurry"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    config = UMT5Config(vocab_size=len(words), d_model=width, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                        relative_attention_num_buckets=8)
    UMT5EncoderModel(config).save_pretrained(folder)


@pytest.mark.parametrize("hidden_layer", [None, 0])
def test_transformers_text_encoder_travels_with_the_export(smoke_student_checkpoint, tmp_path, hidden_layer):
    save_tiny_umt5(tmp_path / "umt5", width=16)
    checkpoint = torch.load(smoke_student_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["run_config"]["text"] = {"encoder": {"_target_": "lightning_tmd.nets.text.PretrainedTextEncoder",
                                                    "path": str(tmp_path / "umt5"), "max_length": 8,
                                                    "hidden_layer": hidden_layer},
                                        "dim": 16, "negative_prompt": "blurry"}
    ckpt = tmp_path / "umt5_student.ckpt"
    torch.save(checkpoint, ckpt)
    encoder = PretrainedTextEncoder(str(tmp_path / "umt5"), max_length=8, hidden_layer=hidden_layer)

    out = export_to(ckpt, tmp_path / "with_text")
    assert (out / "text_encoder" / "config.json").is_file() and (out / "tokenizer").is_dir()
    pipe = TMDPipeline.from_pretrained(out)
    assert torch.equal(pipe.embed_prompts(PROMPTS).states, encoder(PROMPTS).states)
    assert torch.equal(pipe.student.negative_prompt_embeds, encoder(["blurry"]).states[0])
    noise = seeded_noise([0, 1], (3, 4, 16, 16))
    by_prompt = pipe(prompt=PROMPTS, latents=noise, output_type="latent").frames
    by_embeds = pipe(prompt_embeds=encoder(PROMPTS).states, latents=noise, output_type="latent").frames
    assert torch.equal(by_prompt, by_embeds)

    bare = export_to(ckpt, tmp_path / "without_text", "text_encoder=false")
    assert not (bare / "text_encoder").exists()
    pipe = TMDPipeline.from_pretrained(bare)
    assert torch.equal(pipe(prompt_embeds=encoder(PROMPTS).states, latents=noise, output_type="latent").frames,
                       by_embeds)
    with pytest.raises(ValueError, match="no text encoder.*prompt_embeds"):
        pipe(prompt=PROMPTS)
    with pytest.raises(ValueError, match="text_encoder=true"):
        load_generator(bare)


def test_vae_travels_with_the_export_and_decodes_the_samples(stage1, tmp_path):
    ckpt = stage1[0]
    vae = AutoencoderKLWan(base_dim=8, z_dim=3, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[True], latents_mean=[0.1, -0.2, 0.3], latents_std=[0.5, 1.0, 2.0])
    vae.save_pretrained(tmp_path / "wan" / "vae")
    out = export_to(ckpt, tmp_path / "latent", f"vae={tmp_path / 'wan'}")
    pipe = TMDPipeline.from_pretrained(out)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    noise = seeded_noise([0], (3, 4, 16, 16))
    latents = pipe(prompt=PROMPTS[0], latents=noise, output_type="latent").frames
    frames = pipe(prompt=PROMPTS[0], latents=noise, output_type="pt").frames
    mean, std = torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1, 1), torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        z = latents * std + mean  # Wan's model-space latents back to the VAE's
        video = vae.decode(z).sample.clamp(-1, 1)  # the source VAE, (1, 3, 7, 32, 32)
    assert frames.shape == (1, 7, 3, 32, 32)
    torch.testing.assert_close(frames, ((video + 1) / 2).permute(0, 2, 1, 3, 4), atol=1e-5, rtol=0)
    clips, _ = load_generator(out).module.sample(pipe.embed_prompts(PROMPTS[:1]).states, noise=noise)
    torch.testing.assert_close(clips, video, atol=1e-5, rtol=0)  # the sample app writes decoded videos


def test_export_and_pipeline_errors_name_the_fix(stage1, smoke_checkpoint, tmp_path):
    ckpt, out, pipe, _ = stage1
    with pytest.raises(ValueError, match="TeacherModule, not a student.*stage=tm"):
        export_to(smoke_checkpoint, tmp_path / "teacher")
    with pytest.raises(FileNotFoundError, match="ckpt: no checkpoint file"):
        export_to(tmp_path / "missing.ckpt", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="consolidate"):
        export_to(tmp_path, tmp_path / "x")
    with pytest.raises(ValueError, match="dtype='float16'"):
        export_to(ckpt, tmp_path / "x", "dtype=float16")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    for overwrite in ([], ["overwrite=true"]):  # overwrite=true only replaces an earlier export
        with pytest.raises(FileExistsError, match="holds notes.txt but no model_index.json.*choose another out"):
            export_to(ckpt, busy, *overwrite)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    earlier = export_to(ckpt, tmp_path / "earlier")
    (earlier / "stale.txt").write_text("of the earlier export")
    with pytest.raises(FileExistsError, match="holds an earlier export.*overwrite=true"):
        export_to(ckpt, earlier)
    export_to(ckpt, earlier, "overwrite=true")
    assert not (earlier / "stale.txt").exists() and (earlier / "model_index.json").is_file()
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True],
                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(tmp_path / "vae4")
    with pytest.raises(ValueError, match="vae: .* 4 latent channels but the student samples 3"):
        export_to(ckpt, tmp_path / "x", f"vae={tmp_path / 'vae4'}")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_generator(tmp_path)

    embeds = pipe.embed_prompts(PROMPTS).states
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        pipe(prompt=PROMPTS, prompt_embeds=embeds)
    with pytest.raises(ValueError, match=r"prompt_embeds: expected \(B, S, 16\)"):
        pipe(prompt_embeds=torch.zeros(2, 16, 8))
    with pytest.raises(ValueError, match="latents: expected"):
        pipe(prompt=PROMPTS, latents=torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="output_type 'pil'"):
        pipe(prompt=PROMPTS, output_type="pil")
    with pytest.raises(ValueError, match="prompt: an empty list"):
        pipe(prompt=[])
    limit = pipe.student.config.text["max_length"]
    with pytest.warns(UserWarning, match=f"1 of 1 prompt.* limit of {limit} tokens \\(text.encoder.max_length\\)"):
        pipe.embed_prompts([" ".join(["red"] * limit)])


def test_export_overwrite_into_a_training_run_is_refused_and_deletes_nothing(stage1, tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoints/last.ckpt", "checkpoints/step_0000010.ckpt", "tensorboard/events.out.tfevents.1",
                 ".hydra/config.yaml", "train.log"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    with pytest.raises(FileExistsError, match=r"out: '.*run' holds .hydra/, checkpoints/last.ckpt, tensorboard/, "
                                              r"train.log but no model_index.json: it looks like a training run, and "
                                              r"overwrite=true only replaces an earlier export: choose another out"):
        export_to(stage1[0], run, "overwrite=true")
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no partial export beside it


def test_a_student_with_position_planes_and_edm_prediction_round_trips_through_save_pretrained(tmp_path):
    from conftest import TINY_WAN

    from lightning_tmd.diffusers_pipeline import TMDStudentModel

    model = TMDStudentModel(kind="one_pass", transformer={**TINY_WAN, "in_channels": 3 + 6}, sample_shape=[3, 4, 8, 8],
                            text={"kind": "embeddings", "dim": 16, "max_length": 5, "negative_prompt": ""},
                            negative_prompt_shape=[5, 16], outer_steps=2, outer_shift=5.0, position_frequencies=1,
                            prediction="edm", sigma_data=0.5)
    model.save_pretrained(tmp_path)
    loaded = TMDStudentModel.from_pretrained(tmp_path)
    assert loaded.wan.position_frequencies == 1
    assert (loaded.wan.prediction, loaded.wan.sigma_data) == ("edm", 0.5)
    x, t, ctx = torch.randn(2, 3, 4, 8, 8), torch.tensor([900.0, 30.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(loaded.wan(x, t, ctx), model.wan(x, t, ctx))
