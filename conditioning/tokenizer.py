"""The CLIP BPE tokenizer: built offline from the vocabulary in the `clip-anytorch` wheel, ids equal to OpenAI's.

OpenAI's CLIP tokenizer (`clip.simple_tokenizer`) cleans text with `ftfy.fix_text`, unescapes HTML twice,
collapses whitespace, lowercases, splits with one regex and runs byte-level BPE over 48,894 merges.
transformers' (tokenizers-backed) `CLIPTokenizer` has the same regex, BPE and lowercasing but not ftfy
or HTML unescaping, so `tokenize` runs OpenAI's cleaning first (`clean_prompt`); the ids then equal
OpenAI's for every input, and the saved folder still loads with plain `CLIPTokenizer.from_pretrained`.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import logging
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import ftfy
import regex
import torch
from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408  # 256 bytes + 256 bytes-ending-a-word + 48,894 merges + BOS + EOS
_NUM_MERGES = 49152 - 256 - 2  # OpenAI uses the first 48,894 merges of the file
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


class TokenizedPrompts(NamedTuple):
    """A batch of prompts as token ids, padded (with EOS, as Stable Diffusion 1.x does) to max_length."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64, 1 on BOS..EOS, 0 on padding


def clip_bpe_path() -> Path:
    """Path of OpenAI's BPE merges file shipped inside the installed `clip-anytorch` wheel."""
    # find_spec locates the package without importing it: `import clip` needs pkg_resources, which
    # recent setuptools no longer ship, so importlib.resources.files("clip") would fail here.
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the CLIP vocabulary ({_BPE_FILE}) ships in the clip-anytorch package; pip install clip-anytorch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP vocabulary file missing; reinstall clip-anytorch")
    return path


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):  # bytes that are whitespace/control characters get code points 256, 257, ...
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's vocabulary (token -> id, 49,408 entries) and BPE merges ("a b" lines, rank order)."""
    with gzip.open(clip_bpe_path()) as f:  # bytes, split on "\n" only, exactly as OpenAI reads it
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *(m.replace(" ", "") for m in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{clip_bpe_path()}: expected {VOCAB_SIZE} distinct CLIP tokens, built {len(vocab)}")
    return vocab, merges


def write_clip_tokenizer_files(folder: str | Path, max_length: int = 77) -> Path:
    """Write the CLIP tokenizer in the standard layout (vocab.json, merges.txt, configs) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # SD 1.x's tokenizer pads with EOS; unknown tokens cannot occur in byte-level BPE but need a name.
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **special}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, built offline from the clip-anytorch vocabulary file."""
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as folder:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(folder, max_length))


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """Save in the layout SD pipelines use: tokenizer.json + configs, and vocab.json + merges.txt."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    if not (folder / "vocab.json").is_file():  # transformers 5 writes only tokenizer.json
        tokenizer.backend_tokenizer.model.save(str(folder))


def clean_prompt(text: str) -> str:
    """OpenAI CLIP's text cleaning: ftfy, HTML unescaped twice, whitespace collapsed and stripped, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return regex.sub(r"\s+", " ", text).strip().lower()


def validate_prompts(prompts: object, name: str = "prompts") -> list[str]:
    """`prompts` as a non-empty list of str; anything else is an error that names the argument."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise TypeError(f"{name}: expected a str or a list of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name}: is an empty list; pass at least one prompt (use '' for the unconditional one)")
    for i, prompt in enumerate(prompts):
        if prompt is None:
            raise TypeError(f"{name}[{i}]: is None; use '' for an empty (unconditional) prompt")
        if not isinstance(prompt, str):
            raise TypeError(f"{name}[{i}]: expected str, got {type(prompt).__name__}")
    return list(prompts)


def token_count(tokenizer: CLIPTokenizer, prompt: str) -> int:
    """How many tokens `prompt` takes as `tokenize` encodes it, BOS and EOS included (before any truncation)."""
    return len(tokenizer(clean_prompt(prompt), add_special_tokens=True, verbose=False)["input_ids"])


def tokenize(tokenizer: CLIPTokenizer, prompts: str | Sequence[str], max_length: int = 77) -> TokenizedPrompts:
    """Token ids (B, max_length): BOS, tokens, EOS, then EOS padding; longer prompts truncated with a warning.

    Truncation keeps BOS, the first max_length - 2 tokens and EOS, as CLIP and diffusers do.
    """
    texts = [clean_prompt(p) for p in validate_prompts(prompts)]
    # verbose=False: we truncate (and warn) ourselves below.
    ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, lengths, dropped = [], [], []
    for i, seq in enumerate(ids):
        if len(seq) > max_length:
            removed = seq[max_length - 1 : -1]
            dropped.append(f"prompt {i} lost {len(removed)} tokens ({tokenizer.decode(removed)!r})")
            seq = [*seq[: max_length - 1], eos]
        rows.append(seq + [pad] * (max_length - len(seq)))
        lengths.append(len(seq))
    input_ids = torch.tensor(rows, dtype=torch.long)  # (B, L)
    attention_mask = (torch.arange(max_length) < torch.tensor(lengths)[:, None]).long()  # (B, L)
    if dropped:
        logger.warning(
            "%d of %d prompts are longer than %d tokens and were truncated: %s",
            len(dropped),
            len(rows),
            max_length,
            "; ".join(dropped),
        )
    return TokenizedPrompts(input_ids, attention_mask)
