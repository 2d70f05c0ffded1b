import json
import warnings

import pytest
import torch
from conftest import TINY_WAN

from lightning_tmd.nets.text import (
    MiniLMTextEncoder,
    PretrainedTextEncoder,
    PromptEncoder,
    VocabTextEncoder,
    pretrained_text_dim,
)
from lightning_tmd.nets.wan import WanNet
from lightning_tmd.nets.wan_parts import edm_coefficients


def inputs(batch=2):
    return torch.randn(batch, 3, 4, 8, 8), torch.tensor([900.0, 30.0])[:batch], torch.randn(batch, 5, 16)


def test_split_forward_equals_diffusers_forward():
    net = WanNet.from_config(TINY_WAN).eval()
    x, t, ctx = inputs()
    full = net.transformer(x, t, ctx, return_dict=False)[0]
    tokens = net.embed(x, t, ctx)
    h = net.run_blocks(tokens, 0, 1)
    h = net.run_blocks(tokens, 1, net.num_blocks, h)
    split = net.unembed(h, tokens.temb, tokens.grid)
    assert split.shape == x.shape
    assert (split - full).abs().max() <= 1e-6
    assert (net(x, t, ctx) - full).abs().max() <= 1e-6


def test_position_planes_feed_an_absolute_position_to_the_patch_embedding():
    net = WanNet.from_config({**TINY_WAN, "in_channels": 3 + 12}, position_frequencies=2).eval()
    x, t, ctx = inputs()
    planes = net.with_positions(x)[:, 3:]
    assert planes.shape == (2, 12, 4, 8, 8)
    # the lowest frequency's sin is monotone along each axis: first frame -1, last +1; left -1, right +1
    assert torch.allclose(planes[:, 0, 0], torch.tensor(-1.0)) and torch.allclose(planes[:, 0, -1], torch.tensor(1.0))
    assert torch.allclose(planes[:, 2, ..., 0], torch.tensor(-1.0))
    assert torch.allclose(planes[:, 2, ..., -1], torch.tensor(1.0))
    # every (t, y, x) gets its own feature vector
    assert len(planes[0].flatten(1).T.unique(dim=0)) == 4 * 8 * 8
    full = net.transformer(net.with_positions(x), t, ctx, return_dict=False)[0]
    assert full.shape == x.shape
    assert (net(x, t, ctx) - full).abs().max() <= 1e-6
    # the same content at another place gives other tokens
    assert not torch.allclose(net.patchify(x)[:, :1], net.patchify(x.roll(2, dims=-1))[:, 1:2])


@pytest.mark.parametrize("in_channels, frequencies", [(15, 0), (3, 2), (9, 2)])
def test_channel_counts_that_do_not_fit_the_position_planes_are_refused(in_channels, frequencies):
    with pytest.raises(ValueError, match="in_channels"):
        WanNet.from_config({**TINY_WAN, "in_channels": in_channels}, position_frequencies=frequencies)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_coefficients_leave_a_unit_scale_target(sigma_data):
    """c_skip minimises the RMS of v - c_skip x_t and c_out is that RMS (data of RMS sigma_data)."""
    g = torch.Generator().manual_seed(0)
    x = sigma_data * torch.randn(400_000, generator=g, dtype=torch.float64)
    noise = torch.randn(400_000, generator=g, dtype=torch.float64)

    def rms(t: float, c_skip: float) -> float:
        return ((noise - x - c_skip * ((1 - t) * x + t * noise)) ** 2).mean().sqrt().item()

    for t in (0.0, 0.3, 0.7, 0.95, 1.0):
        c_skip, c_out = (c.item() for c in edm_coefficients(torch.tensor(t, dtype=torch.float64), sigma_data))
        assert rms(t, c_skip) == pytest.approx(c_out, rel=0.01)
        assert rms(t, c_skip) < min(rms(t, c_skip + 0.05), rms(t, c_skip - 0.05))
    assert edm_coefficients(torch.tensor(1.0), sigma_data) == (1.0, sigma_data)  # v = x_t + sd F: F is -x0 / sd
    assert edm_coefficients(torch.tensor(0.0), sigma_data) == (-1.0, 1.0)  # v = -x_t + F: F is the noise


def test_edm_prediction_wraps_the_same_transformer_output():
    net = WanNet.from_config(TINY_WAN, prediction="edm", sigma_data=0.5).eval()
    x, _, ctx = inputs()
    t = torch.tensor([1.0, 0.3], dtype=torch.float64)
    with torch.no_grad():
        out = net(x, 1000 * t.float(), ctx)
        c_skip, c_out = edm_coefficients(t.view(-1, 1, 1, 1, 1), 0.5)
        assert torch.allclose(net.velocity(x, t, ctx), (c_skip * x + c_out * out).float(), atol=1e-6)
        # at t = 1 the clean estimate is the net's own output alone, whatever the noise
        assert torch.allclose(net.x0(x, t, ctx)[0], -0.5 * out[0], atol=1e-6)
    with pytest.raises(ValueError, match="model.prediction"):
        WanNet.from_config(TINY_WAN, prediction="x0")


def test_embed_time_matches_the_condition_embedder():
    net = WanNet.from_config(TINY_WAN)
    x, t, ctx = inputs()
    tokens = net.embed(x, t, ctx)
    temb, proj = net.embed_time(t, x.dtype)
    torch.testing.assert_close(temb, tokens.temb)
    torch.testing.assert_close(proj, tokens.timestep_proj)


def test_block_features_are_unpatchified_hidden_states():
    net = WanNet.from_config(TINY_WAN)
    x, t, ctx = inputs()
    feats = net.block_features(x, t, ctx, [3, 1])
    width = 2 * 12 // 4  # D / (pt * ph * pw)
    assert [f.shape for f in feats] == [(2, width, 4, 8, 8)] * 2
    tokens = net.embed(x, t, ctx)
    first = net.unpatchify(net.run_blocks(tokens, 0, 1), tokens.grid)
    torch.testing.assert_close(feats[1], first)
    with pytest.raises(ValueError, match="outside"):
        net.block_features(x, t, ctx, [4])


def test_checkpointed_blocks_give_the_same_gradients():
    net = WanNet.from_config(TINY_WAN)
    x, t, ctx = inputs()
    net(x, t, ctx).square().mean().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.checkpoint_blocks = True
    net(x, t, ctx).square().mean().backward()
    for a, p in zip(plain, net.parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("layout", ["transformer_folder", "repository_root"])
def test_save_pretrained_round_trip(tmp_path, layout):
    net = WanNet.from_config(TINY_WAN).eval()
    folder = tmp_path / "transformer" if layout == "repository_root" else tmp_path
    net.save_pretrained(folder)
    loaded = WanNet.build(path=str(tmp_path)).eval()  # the code path of real Wan weights
    x, t, ctx = inputs()
    assert torch.equal(loaded(x, t, ctx), net(x, t, ctx))
    bf16 = WanNet.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert bf16.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert bf16.transformer.scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules


def test_missing_or_incomplete_weights_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path.*does not exist"):
        WanNet.build(path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        WanNet.build(path=str(tmp_path))
    WanNet.from_config(TINY_WAN).save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no transformer weights"):
        WanNet.build(path=str(tmp_path))
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="00001-of-00002"):
        WanNet.build(path=str(tmp_path))


def test_cast_keeps_wans_fp32_modules_like_from_pretrained(tmp_path):
    net = WanNet.from_config(TINY_WAN)
    net.save_pretrained(tmp_path)
    loaded = WanNet.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    cast = WanNet.from_config(TINY_WAN)
    cast.load_state_dict(net.state_dict())
    cast.cast(torch.bfloat16)
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert {name: p.dtype for name, p in cast.named_parameters()} == dtypes
    assert torch.float32 in dtypes.values() and torch.bfloat16 in dtypes.values()
    x, t, ctx = torch.randn(2, 3, 2, 8, 8), torch.tensor([300.0, 700.0]), torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = cast(x, t, ctx).float()
    assert (half - net(x, t, ctx)).abs().max() < 0.1


def test_vocab_encoder_is_deterministic_and_padded():
    enc = VocabTextEncoder(dim=16, max_length=8)
    a, b = enc(["a red circle moving up", ""]), VocabTextEncoder(dim=16, max_length=8)(["a red circle moving up"])
    assert a.states.shape == (2, 8, 16)
    assert a.mask.sum(1).tolist() == [6, 1]
    assert torch.equal(a.states[:1], b.states)
    assert a.states[0, 6:].abs().sum() == 0  # zero after the last token
    assert not torch.equal(enc(["a blue circle"]).states, enc(["a red circle"]).states)


def save_tiny_umt5(folder):
    """A tiny UMT5 encoder and a word-level tokenizer, built from configs (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "up", "and"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    config = UMT5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8)
    UMT5EncoderModel(config).save_pretrained(folder)


def test_transformers_encoder_loads_from_a_folder(tmp_path):
    save_tiny_umt5(tmp_path)
    assert pretrained_text_dim(tmp_path) == 32
    enc = PretrainedTextEncoder(str(tmp_path), max_length=6)
    out = enc(["a red circle moving up and", "a blue square"])
    assert enc.dim == 32 and out.states.shape == (2, 6, 32)
    assert out.mask.sum(1).tolist() == [6, 3]
    assert out.states[1, 3:].abs().sum() == 0
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(FileNotFoundError, match="text.encoder.path"):
        PretrainedTextEncoder(str(tmp_path / "missing"))


def test_transformers_states_do_not_depend_on_the_batch(tmp_path):
    """The encoder runs padded to the batch's longest caption; a caption's states are the same in any batch
    and the output is always padded to max_length."""
    save_tiny_umt5(tmp_path)
    enc = PretrainedTextEncoder(str(tmp_path), max_length=8)
    alone = enc(["a blue square"])
    mixed = enc(["a red circle moving up and", "a blue square"])
    assert alone.states.shape[1:] == mixed.states.shape[1:] == (8, 32)
    torch.testing.assert_close(alone.states[0], mixed.states[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(alone.mask[0], mixed.mask[1])


def test_an_intermediate_layer_of_the_text_encoder_can_be_picked(tmp_path):
    save_tiny_umt5(tmp_path)
    captions = ["a red circle moving up and", "a blue square"]
    output = PretrainedTextEncoder(str(tmp_path), max_length=8)(captions)
    first = PretrainedTextEncoder(str(tmp_path), max_length=8, hidden_layer=1)(captions)
    penultimate = PretrainedTextEncoder(str(tmp_path), max_length=8, hidden_layer=-2)(captions)
    torch.testing.assert_close(first.states, penultimate.states)  # two layers: layer 1 is the penultimate
    assert not torch.allclose(first.states, output.states)
    assert torch.equal(first.mask, output.mask) and first.states[1, 3:].abs().sum() == 0
    for layer in (3, -4):
        with pytest.raises(ValueError, match="text.encoder.hidden_layer"):
            PretrainedTextEncoder(str(tmp_path), hidden_layer=layer)


def test_minilm_from_the_package_gives_384_wide_states():
    enc = MiniLMTextEncoder(max_length=12)
    out = enc(["a red circle moving up", ""])
    assert enc.dim == 384 and out.states.shape == (2, 12, 384)
    assert out.mask[1].sum() == 2  # [CLS] [SEP]



LONG = "a red circle moving up and a blue square"  # 9 words


def test_overlong_prompts_are_cut_with_one_warning_naming_the_limit(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prompts within the limit: no warning
        VocabTextEncoder(16, 10)([LONG, "a blue square"])
    with pytest.warns(UserWarning) as caught:
        out = VocabTextEncoder(16, 6)(["a blue square", LONG, LONG + " moving up"])
    assert out.mask.sum(1).tolist() == [4, 6, 6]
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("2 of 3 prompt(s) exceed the text encoder's limit of 6 tokens (text.encoder.max_length) "
                              "and were cut: prompt 2 has 10 tokens and loses 'and a blue square'; prompt 3 has "
                              "12 tokens and loses 'and a blue square moving up'. Shorten them, or raise "
                              "text.encoder.max_length before preprocessing and training")

    save_tiny_umt5(tmp_path)  # a word-level tokenizer without special tokens
    with pytest.warns(UserWarning, match="1 of 2 prompt.* limit of 4 tokens .*prompt 1 has 9 tokens and loses "
                                         "'up and a blue square'"):
        out = PretrainedTextEncoder(str(tmp_path), max_length=4)([LONG, "a blue square"])
    assert out.mask.sum(1).tolist() == [4, 3]


def test_minilm_names_the_words_it_cuts_after_its_special_tokens():
    with pytest.warns(UserWarning, match="limit of 6 tokens .*prompt 1 has 11 tokens and loses 'up and a blue square'"):
        MiniLMTextEncoder(max_length=6)([LONG])  # [CLS] a red circle moving [SEP]


def test_empty_prompts(tmp_path):
    """An empty caption is a valid prompt for every encoder; an empty list is an empty batch, and an error
    where prompts are looked up."""
    save_tiny_umt5(tmp_path)
    enc = PretrainedTextEncoder(str(tmp_path), max_length=6)  # its tokenizer gives "" no token at all
    alone, mixed = enc([""]), enc(["", "a blue square"])
    assert alone.states.shape == (1, 6, 32) and not alone.mask.any() and alone.states.abs().sum() == 0
    assert torch.equal(alone.states[0], mixed.states[0]) and torch.equal(alone.mask[0], mixed.mask[0])
    assert enc([]).states.shape == (0, 6, 32) and VocabTextEncoder(16, 8)([]).states.shape == (0, 8, 16)
    with pytest.raises(ValueError, match="no prompts to embed"):
        PromptEncoder(VocabTextEncoder(16, 8), "")([])

def test_prompt_encoder_caches_and_needs_a_negative_prompt():
    calls = []

    class Counting(VocabTextEncoder):
        def forward(self, captions):
            calls.append(list(captions))
            return super().forward(captions)

    prompts = PromptEncoder(Counting(16, 8), "")
    first = prompts(["a", "b", "a"])
    again = prompts(["b", "a"])
    assert calls == [["a", "b"]]
    assert torch.equal(first.states[1], again.states[0])
    assert prompts.negative(3).states.shape == (3, 8, 16)
    with pytest.raises(ValueError, match="text.negative_prompt"):
        PromptEncoder(VocabTextEncoder(16, 8), None)


def test_patchify_adds_the_planes_embedding_once_computed_as_if_they_were_channels():
    net = WanNet.from_config({**TINY_WAN, "in_channels": 3 + 12}, position_frequencies=2).eval()
    x = torch.randn(2, 3, 4, 8, 8)
    with torch.no_grad():
        reference = net.transformer.patch_embedding(net.with_positions(x)).flatten(2).transpose(1, 2)
        positions = net.position_embedding(x)
        assert positions.shape == (1, 4 * 4 * 4, net.inner_dim)
        torch.testing.assert_close(net.patchify(x), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net.patchify(x, positions), reference, atol=1e-5, rtol=1e-5)
        assert torch.equal(net.embed(x, torch.full((2,), 500.0), torch.randn(2, 5, 16)).positions, positions)
