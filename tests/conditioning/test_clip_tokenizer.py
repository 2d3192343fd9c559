"""The CLIP tokenizer built from the clip-anytorch vocabulary gives OpenAI CLIP's ids."""

import importlib.util
import json
import logging

import pytest
import torch
from transformers import CLIPTokenizer

from conditioning.tokenizer import (
    VOCAB_SIZE,
    build_clip_tokenizer,
    clean_prompt,
    clip_bpe_path,
    save_tokenizer,
    tokenize,
    write_clip_tokenizer_files,
)

BOS, EOS = 49406, 49407

# Punctuation, case, numbers, whitespace, contractions, and unicode that transformers' tokenizer alone gets
# wrong (HTML entities, mojibake, ligatures, final sigma, control characters) without OpenAI's cleaning.
PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT!!",
    "Hello, World... it's 2024; don't panic?",
    "  lots   of\t\twhite\nspace  ",
    "x=3.14159, y=-2e10 #hashtag @user 100% (ok)",
    "I'M HERE, YOU'RE THERE, WE'VE GONE, HE'D, SHE'LL",
    "café naïve résumé",
    "東京タワーの写真",
    "emoji 🐱🚀 test",
    "ΟΔΟΣ Σίσυφος",
    "Fish &amp; chips &lt;3",
    "cafÃ© mojibake",
    "İstanbul ǅ ß ﬁsh",
    "\u00a0nbsp\u2003em space\u200bzero width",
    "a\x1cb",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def openai_tokenizer():
    """clip-anytorch's SimpleTokenizer (OpenAI's code), loaded from its file: `import clip` needs pkg_resources."""
    path = clip_bpe_path().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(clip_bpe_path()))


def unpadded(ids: torch.Tensor) -> list[int]:
    """Token ids up to and including the first EOS."""
    ids = ids.tolist()
    return ids[: ids.index(EOS) + 1]


def test_a_photo_of_a_cat_has_openai_ids(tokenizer):
    ids = tokenize(tokenizer, "a photo of a cat").input_ids
    assert unpadded(ids[0]) == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocabulary_has_49408_tokens(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [BOS, EOS]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_openai_simple_tokenizer(tokenizer, openai_tokenizer, prompt):
    ids = tokenize(tokenizer, prompt).input_ids[0]
    assert unpadded(ids) == [BOS, *openai_tokenizer.encode(prompt), EOS]


def test_case_and_whitespace_do_not_change_ids(tokenizer):
    ids = tokenize(tokenizer, ["a photo of a cat", "  A\tPhoto  OF a\nCAT "]).input_ids
    assert torch.equal(ids[0], ids[1])


def test_punctuation_is_split_from_words(tokenizer):
    ids = unpadded(tokenize(tokenizer, "cat, dog!").input_ids[0])
    assert ids == [BOS, *tokenizer.convert_tokens_to_ids(["cat</w>", ",</w>", "dog</w>", "!</w>"]), EOS]


def test_clean_prompt_follows_openai(tokenizer):
    assert clean_prompt("  Fish &amp;amp; CHIPS\n") == "fish & chips"


def test_padding_is_eos_to_77_with_mask(tokenizer):
    tokens = tokenize(tokenizer, ["a photo of a cat", ""])
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (2, 77)
    assert tokens.input_ids[0, 7:].eq(EOS).all() and tokens.attention_mask[0].sum() == 7
    assert tokens.input_ids[1, :2].tolist() == [BOS, EOS] and tokens.attention_mask[1].sum() == 2


def test_long_prompt_is_truncated_with_a_warning_counting_dropped_tokens(tokenizer, caplog):
    long_prompt = " ".join(["cat"] * 100)  # 100 tokens + BOS + EOS = 102 -> 25 dropped
    with caplog.at_level(logging.WARNING, logger="conditioning.tokenizer"):
        tokens = tokenize(tokenizer, ["a photo of a cat", long_prompt])
    assert "prompt 1 lost 25 tokens" in caplog.text
    row = tokens.input_ids[1].tolist()
    assert row[0] == BOS and row[-1] == EOS and row[1:-1] == [2368] * 75
    assert tokens.attention_mask[1].all()


def test_prompt_of_exactly_77_tokens_is_not_truncated(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="conditioning.tokenizer"):
        tokens = tokenize(tokenizer, " ".join(["cat"] * 75))
    assert caplog.text == ""
    assert tokens.input_ids[0, -1] == EOS and tokens.input_ids[0, -2] == 2368


def test_standard_folder_loads_with_from_pretrained(tokenizer, tmp_path):
    write_clip_tokenizer_files(tmp_path / "raw")
    assert json.loads((tmp_path / "raw" / "vocab.json").read_text())["cat</w>"] == 2368
    save_tokenizer(tokenizer, tmp_path / "saved")
    for folder in (tmp_path / "raw", tmp_path / "saved"):
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
        loaded = CLIPTokenizer.from_pretrained(folder)
        assert loaded.model_max_length == 77 and loaded.pad_token_id == EOS
        for prompt in PROMPTS:
            assert torch.equal(tokenize(loaded, prompt).input_ids, tokenize(tokenizer, prompt).input_ids)


@pytest.mark.parametrize(
    ("prompts", "error", "message"),
    [
        (3, TypeError, "prompts: expected a str or a list of str, got int"),
        (b"a cat", TypeError, "prompts: expected a str or a list of str, got bytes"),
        ([], ValueError, "prompts: is an empty list"),
        (["a cat", None], TypeError, r"prompts\[1\]: is None"),
        (["a cat", 7], TypeError, r"prompts\[1\]: expected str, got int"),
    ],
)
def test_bad_prompts_are_errors_naming_the_argument(tokenizer, prompts, error, message):
    with pytest.raises(error, match=message):
        tokenize(tokenizer, prompts)
