"""The text encoder: shapes, layer choice, frozen/trainable, save/reload, CFG helpers, bad inputs."""

import pytest
import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from conditioning import TextEncoder, TextEncoderConfig
from conditioning.tokenizer import tokenize

PROMPTS = ["a photo of a cat", "a red bicycle leaning on a wall, golden hour", ""]


def test_encode_gives_77_token_states_and_pooled_eos_state(small_encoder):
    out = small_encoder(PROMPTS)
    assert out.hidden_states.shape == (3, 77, 128) and out.pooled.shape == (3, 128)
    assert torch.equal(small_encoder.encode(PROMPTS), out.hidden_states)
    ids = small_encoder.tokenize(PROMPTS).input_ids
    first_eos = [row.tolist().index(49407) for row in ids]
    assert first_eos[0] == 6 and first_eos[2] == 1  # BOS + 5 tokens; BOS only
    for row, pos in enumerate(first_eos):
        assert torch.equal(out.pooled[row], out.hidden_states[row, pos])


def test_a_prompt_encodes_the_same_alone_and_in_a_batch(small_encoder):
    batch = small_encoder.encode(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(small_encoder.encode(prompt)[0], batch[row], rtol=1e-5, atol=1e-5)


def test_clip_skip_is_penultimate_layer_with_final_layer_norm_as_in_diffusers(small_encoder):
    skip = TextEncoder(small_encoder.model, small_encoder.tokenizer, TextEncoderConfig(clip_skip=1))
    ids = tokenize(small_encoder.tokenizer, PROMPTS).input_ids
    with torch.no_grad():  # diffusers' StableDiffusionPipeline.encode_prompt with clip_skip=1
        states = small_encoder.model(ids, output_hidden_states=True).hidden_states
        expected = small_encoder.model.final_layer_norm(states[-(1 + 1)])
    assert len(states) == 2 + 1  # embeddings + one per layer
    torch.testing.assert_close(skip.encode(PROMPTS), expected)
    assert not torch.allclose(skip.encode(PROMPTS), small_encoder.encode(PROMPTS), atol=1e-3)


def test_clip_skip_beyond_a_loaded_encoders_layers_is_an_error_naming_the_key(small_encoder):
    one_layer = TextEncoder.from_config(TextEncoderConfig(num_layers=1, hidden_size=32, num_heads=2))
    with pytest.raises(ValueError, match="clip_skip: 1 is too large for a 1-layer text encoder"):
        TextEncoder(one_layer.model, one_layer.tokenizer, TextEncoderConfig(clip_skip=1))


def test_frozen_encoder_has_no_grads(small_encoder):
    assert all(not p.requires_grad for p in small_encoder.parameters())
    parent = nn.ModuleDict({"text": small_encoder, "head": nn.Linear(128, 1)})
    parent.train()  # a frozen encoder ignores its parent's train()
    assert not small_encoder.training and not small_encoder.model.training
    context = small_encoder.encode(PROMPTS)
    assert not context.requires_grad
    parent["head"](context).mean().backward()
    assert all(p.grad is None for p in small_encoder.parameters())
    assert parent["head"].weight.grad is not None


def test_unfrozen_encoder_trains():
    encoder = TextEncoder.from_config(TextEncoderConfig(frozen=False, num_layers=1, hidden_size=32, num_heads=2))
    nn.ModuleDict({"text": encoder}).eval().train()
    assert encoder.training
    context = encoder.encode(PROMPTS)
    assert context.requires_grad
    context.square().mean().backward()
    assert encoder.model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    encoder.set_frozen(True)
    assert not encoder.training and all(not p.requires_grad for p in encoder.parameters())


def test_an_unfrozen_encoder_can_keep_its_token_table_fixed():
    config = TextEncoderConfig(frozen=False, train_token_embedding=False, num_layers=1, hidden_size=32, num_heads=2)
    encoder = TextEncoder.from_config(config)
    encoder.encode(PROMPTS).square().mean().backward()
    assert encoder.model.embeddings.token_embedding.weight.grad is None
    assert encoder.model.embeddings.position_embedding.weight.grad.abs().sum() > 0
    assert encoder.model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_save_and_reload_gives_identical_embeddings(small_encoder, tmp_path):
    small_encoder.save_pretrained(tmp_path)
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
    assert (tmp_path / "text_encoder" / "config.json").is_file()
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "tokenizer").iterdir()}

    reloaded = TextEncoder.from_pretrained(tmp_path)
    before, after = small_encoder(PROMPTS), reloaded(PROMPTS)
    assert torch.equal(before.hidden_states, after.hidden_states) and torch.equal(before.pooled, after.pooled)
    assert reloaded.frozen and not reloaded.training
    assert reloaded.fingerprint() == small_encoder.fingerprint()

    # The folders are plain transformers folders: an SD pipeline or a user loads them without our code.
    model = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    ids = tokenize(CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"), PROMPTS).input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, before.hidden_states)


def test_loads_a_bare_clip_folder_with_model_and_tokenizer_side_by_side(small_encoder, tmp_path):
    # The layout of hub ids like openai/clip-vit-large-patch14: no text_encoder/ or tokenizer/ subfolders.
    small_encoder.model.save_pretrained(tmp_path)
    small_encoder.tokenizer.save_pretrained(tmp_path)
    config = TextEncoderConfig(pretrained=str(tmp_path), text_encoder_subfolder="", tokenizer_subfolder="")
    loaded = TextEncoder.from_config(config)
    assert torch.equal(loaded.encode(PROMPTS), small_encoder.encode(PROMPTS))
    # Saved, it takes the model folder's standard layout, not the one it was read from.
    loaded.save_pretrained(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"text_encoder", "tokenizer"}
    assert torch.equal(TextEncoder.from_pretrained(tmp_path / "model").encode(PROMPTS), small_encoder.encode(PROMPTS))


def test_small_encoder_is_seeded_and_leaves_the_global_rng_alone():
    config = TextEncoderConfig(num_layers=1, hidden_size=32, num_heads=2, seed=3)
    torch.manual_seed(0)
    a = TextEncoder.from_config(config)
    after_build = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after_build)
    b = TextEncoder.from_config(config)
    assert torch.equal(a.encode("a cat"), b.encode("a cat"))
    other = TextEncoder.from_config(TextEncoderConfig(num_layers=1, hidden_size=32, num_heads=2, seed=4))
    assert not torch.equal(a.encode("a cat"), other.encode("a cat"))


def test_unconditional_is_the_empty_prompt_computed_once(small_encoder):
    uncond = small_encoder.unconditional(4)
    assert uncond.shape == (4, 77, 128)
    assert torch.equal(uncond[2], small_encoder.encode("")[0])
    assert small_encoder.unconditional(2).data_ptr() == uncond.data_ptr()  # cached, not re-encoded


def test_negative_prompt_replaces_the_empty_prompt(small_encoder):
    cond, uncond = small_encoder.encode_for_guidance(PROMPTS[:2])
    assert torch.equal(cond, small_encoder.encode(PROMPTS[:2]))
    assert torch.equal(uncond, small_encoder.unconditional(2))
    _, negative = small_encoder.encode_for_guidance(PROMPTS[:2], negative_prompt="blurry, low quality")
    assert negative.shape == (2, 77, 128)
    assert torch.equal(negative[1], small_encoder.encode("blurry, low quality")[0])
    _, per_prompt = small_encoder.encode_for_guidance(PROMPTS[:2], negative_prompt=["blurry", "dark"])
    assert torch.equal(per_prompt, small_encoder.encode(["blurry", "dark"]))
    with pytest.raises(ValueError, match="negative_prompt: has 3 prompts, expected 1"):
        small_encoder.encode_for_guidance(PROMPTS[:2], negative_prompt=["a", "b", "c"])
    with pytest.raises(TypeError, match=r"negative_prompt\[0\]: is None"):
        small_encoder.encode_for_guidance(PROMPTS[:2], negative_prompt=[None, "b"])


@pytest.mark.parametrize(
    ("prompts", "error", "message"),
    [
        (42, TypeError, "prompts: expected a str or a list of str, got int"),
        (torch.zeros(2), TypeError, "prompts: expected a str or a list of str, got Tensor"),
        ([], ValueError, "prompts: is an empty list"),
        (("a cat", None), TypeError, r"prompts\[1\]: is None"),
    ],
)
def test_bad_prompts_are_errors_naming_the_argument(small_encoder, prompts, error, message):
    with pytest.raises(error, match=message):
        small_encoder.encode(prompts)


def test_a_trained_encoder_with_clip_skip_gives_every_trainable_parameter_a_gradient():
    # DistributedDataParallel stops a run whose trainable parameters get no gradient; with clip_skip = 1 the last
    # layer's output is never used, so that layer must not count as trained.
    config = TextEncoderConfig(frozen=False, clip_skip=1, num_layers=2, hidden_size=32, num_heads=2)
    encoder = TextEncoder.from_config(config)
    encoder.encode(PROMPTS).square().mean().backward()
    trainable = {name: p for name, p in encoder.model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for p in trainable.values()), [
        name for name, p in trainable.items() if p.grad is None
    ]
    assert not any(p.requires_grad for p in encoder.model.encoder.layers[-1].parameters())
    assert all(p.requires_grad for p in encoder.model.encoder.layers[0].parameters())
    encoder.set_frozen(True)
    encoder.set_frozen(False)  # unfreezing again keeps the skipped layer out
    assert not any(p.requires_grad for p in encoder.model.encoder.layers[-1].parameters())
