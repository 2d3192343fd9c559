"""One safetensors file holding a cache: named tensors, a list of strings, a format tag and a fingerprint.

Both caches (caption embeddings in `conditioning.cache`, VAE moments in `ldm.training.latent_cache`) store
their data this way. The header carries {"format", "fingerprint", ...}, so whether a cache is stale can be
decided from the header alone. A file is written under a temporary name beside the target and renamed over
it, so a crash leaves either the old cache or the new one, never half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# The strings travel as a UTF-8 JSON byte tensor, not in the header: the header has a size cap, tensors do not.
# The name predates this module (both caches store captions); it is part of the file format.
STRINGS_TENSOR = "captions_json"
_RESERVED_METADATA = frozenset({"format", "fingerprint"})


@dataclass
class CacheFile:
    """The contents of a cache file: its tensors (without the strings), strings, fingerprint and full header."""

    tensors: dict[str, torch.Tensor]
    strings: list[str]
    fingerprint: str
    metadata: dict[str, str]


def write_cache_file(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    strings: Sequence[str],
    fmt: str,
    fingerprint: str,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomically write `tensors` and `strings` to `path` with header {"format": fmt, "fingerprint", **extra}."""
    path = Path(path)
    if STRINGS_TENSOR in tensors:
        raise ValueError(f"tensors: {STRINGS_TENSOR!r} is reserved for the strings; use another tensor name")
    clashes = _RESERVED_METADATA & set(extra_metadata or {})
    if clashes:
        raise ValueError(f"extra_metadata: {sorted(clashes)} are written by write_cache_file; use other keys")
    payload = {name: tensor.contiguous() for name, tensor in tensors.items()}
    payload[STRINGS_TENSOR] = _encode_strings(strings)
    metadata = {**(extra_metadata or {}), "format": fmt, "fingerprint": fingerprint}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the rename stays on one file system and is atomic.
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(payload, str(tmp), metadata=metadata)
        _fsync(tmp)  # the bytes must be on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # make the rename itself survive a power cut


def write_json_atomically(path: str | Path, value: object) -> None:
    """Write `value` as JSON to `path` under a temporary name beside it, then rename: never half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_cache_file(path: str | Path, fmt: str, what: str, remedy: str = "", tensors: bool = True) -> CacheFile:
    """Read a file written by `write_cache_file` with format `fmt`; errors name `path` and the `what` expected.

    `tensors=False` reads the strings only (the tensors of a large cache are read per row instead).

    A missing file is a FileNotFoundError ("{path}: no {what} here; {remedy}"); a file of another format
    or not a safetensors file at all is a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} here" + (f"; {remedy}" if remedy else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != fmt:  # checked before any tensor is read
                raise ValueError(f"{path}: not a {what} (format {metadata.get('format')!r}, expected {fmt!r})")
            names = [name for name in f.keys() if tensors or name == STRINGS_TENSOR]  # noqa: SIM118 (not iterable)
            loaded = {name: f.get_tensor(name) for name in names}
    except SafetensorError as error:
        raise ValueError(f"{path}: not a {what} (not a readable safetensors file: {error})") from error
    if STRINGS_TENSOR not in loaded or "fingerprint" not in metadata:
        raise ValueError(f"{path}: damaged {what}: no {STRINGS_TENSOR!r} tensor or no fingerprint in the header")
    strings = json.loads(loaded.pop(STRINGS_TENSOR).numpy().tobytes().decode())
    return CacheFile(loaded, strings, metadata["fingerprint"], metadata)


def cache_file_fingerprint(path: str | Path, fmt: str) -> str | None:
    """The fingerprint in the header of the cache at `path` (tensors are not read).

    None when there is no file, it is not a safetensors file, or its format is not `fmt` (e.g. an older
    version): in each case the cache has to be built.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError:
        return None
    return metadata.get("fingerprint") if metadata.get("format") == fmt else None


def _encode_strings(strings: Sequence[str]) -> torch.Tensor:
    """The strings as a 1-D uint8 tensor of UTF-8 JSON (never empty: "[]" has two bytes)."""
    data = json.dumps(list(strings), ensure_ascii=False).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _fsync(path: Path) -> None:
    """Flush a written file's data to disk (a read-only handle is enough, and opens nothing for writing)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_directory(directory: Path) -> None:
    """Flush a directory entry (the rename); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
