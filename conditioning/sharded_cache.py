"""A cache too large for memory: a folder of part files, built in parallel by all ranks, read row by row.

Both caches (caption embeddings in `conditioning.cache`, VAE moments in `ldm.training.latent_cache`) are
stored this way:

    FOLDER/part-00000.safetensors ... part-NNNNN.safetensors   (each a `conditioning.cache_file`)
    FOLDER/manifest.json   {"format", "fingerprint", "parts": [rows per part]}, written last

- **Built in pieces, by every rank.** Part p is written by rank p % world_size, so the build takes
  1/world_size of the time and no rank waits at the barrier for more than the slowest rank's last part.
  A part whose header already carries this cache's fingerprint is kept, so a build that was killed
  resumes where it stopped. The manifest is written by rank 0 once every part exists; a folder without
  one is an unfinished build.
- **Read per row.** `ShardedCache` keeps only the strings and an offset table in memory; `rows(name,
  indices)` reads the requested rows with `os.preadv` into a fresh tensor. Reads bypass the process's
  memory map entirely, so the process's resident memory does not grow with the cache (a memory map
  would count every page ever touched), and the file's pages live in the OS page cache, shared by all
  processes of a node.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conditioning.cache_file import cache_file_fingerprint, read_cache_file, write_cache_file, write_json_atomically

MANIFEST = "manifest.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

PartBuilder = Callable[[int], tuple[dict[str, torch.Tensor], list[str]]]


def part_path(folder: Path, part: int) -> Path:
    """The file of part `part`."""
    return folder / f"part-{part:05d}.safetensors"


def part_fingerprint(fingerprint: str, content: str, part: int, num_parts: int) -> str:
    """A part's own fingerprint: the cache's, a digest of what its rows are (e.g. of the caption list), its
    index and the part count, so a part of another build or another split is stale."""
    return f"{fingerprint}/{content}/{part}-of-{num_parts}"


def read_manifest(folder: str | Path, fmt: str) -> dict | None:
    """The manifest of a finished cache of format `fmt` at `folder`, else None (absent, unfinished, other format)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == fmt else None


def no_barrier() -> None:
    """A single process has nobody to wait for."""


def build_sharded(
    folder: str | Path,
    fmt: str,
    fingerprint: str,
    num_parts: int,
    make_part: PartBuilder,
    content: str = "",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = no_barrier,
    desc: str = "caching",
) -> None:
    """Build the cache at `folder` with every rank of a launch: each calls this with its `rank`, the
    `world_size` and a `barrier` (e.g. `accelerator.wait_for_everyone`) and writes its share of the parts;
    rank 0 then writes the manifest, and every rank returns once it exists.

    `make_part(p)` returns part p's named row tensors (first dimension: rows) and one string per row;
    `content` is a digest of the rows' inputs beyond `fingerprint`.
    """
    _write_owned_parts(folder, fmt, fingerprint, num_parts, make_part, content, rank, world_size, desc)
    barrier()
    if rank == 0:
        _write_manifest(folder, fmt, fingerprint, num_parts, content)
    barrier()


def _write_owned_parts(
    folder: str | Path,
    fmt: str,
    fingerprint: str,
    num_parts: int,
    make_part: PartBuilder,
    content: str,
    rank: int,
    world_size: int,
    desc: str,
) -> None:
    """Write the parts this rank owns (p % world_size == rank) that are missing or stale; only rank 0 shows a
    progress bar (over its own share)."""
    folder = Path(folder)
    if rank == 0:
        (folder / MANIFEST).unlink(missing_ok=True)  # an older manifest must not outlive the parts it describes
    owned = [
        p
        for p in range(rank, num_parts, world_size)
        if not _part_is_current(folder, fmt, fingerprint, content, p, num_parts)
    ]
    for part in tqdm(owned, desc=desc, unit="part", disable=rank != 0):
        tensors, strings = make_part(part)
        rows = {name: len(t) for name, t in tensors.items()}
        if any(n != len(strings) for n in rows.values()):
            raise ValueError(f"{part_path(folder, part)}: {len(strings)} strings but rows {rows}")
        extra = {"rows": str(len(strings))}
        write_cache_file(
            part_path(folder, part),
            tensors,
            strings,
            fmt,
            part_fingerprint(fingerprint, content, part, num_parts),
            extra,
        )


def _write_manifest(folder: str | Path, fmt: str, fingerprint: str, num_parts: int, content: str) -> None:
    """Rank 0, once every rank wrote its parts: check them and write the manifest that marks the cache done."""
    folder = Path(folder)
    rows = []
    for part in range(num_parts):
        if not _part_is_current(folder, fmt, fingerprint, content, part, num_parts):
            raise RuntimeError(f"{part_path(folder, part)}: missing or stale after the build; did a rank fail?")
        rows.append(_RowFile(part_path(folder, part)).num_rows)
    manifest = {"format": fmt, "fingerprint": fingerprint, "content": content, "parts": rows}
    write_json_atomically(folder / MANIFEST, manifest)


def num_parts_for(num_rows: int, part_size: int) -> int:
    """How many parts of `part_size` rows hold `num_rows` rows (at least one)."""
    if part_size < 1:
        raise ValueError(f"part_size: must be >= 1, got {part_size}")
    return max(1, math.ceil(num_rows / part_size))


def _part_is_current(folder: Path, fmt: str, fingerprint: str, content: str, part: int, num_parts: int) -> bool:
    expected = part_fingerprint(fingerprint, content, part, num_parts)
    return cache_file_fingerprint(part_path(folder, part), fmt) == expected


class ShardedCache:
    """A finished sharded cache, opened for reading rows; holds its strings, not its tensors."""

    def __init__(self, folder: str | Path, fmt: str, what: str, remedy: str = "") -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder, fmt)
        if manifest is None:
            raise FileNotFoundError(
                f"{self.folder}: no finished {what} here (no {MANIFEST})" + (f"; {remedy}" if remedy else "")
            )
        self.fingerprint: str = manifest["fingerprint"]
        self.parts = [_RowFile(part_path(self.folder, p)) for p in range(len(manifest["parts"]))]
        self.strings: list[str] = []
        self._part_of_row: list[tuple[int, int]] = []  # row -> (part, row within the part)
        for p, part in enumerate(self.parts):
            strings = read_cache_file(part.path, fmt, what, remedy, tensors=False).strings
            self.strings.extend(strings)
            self._part_of_row.extend((p, r) for r in range(len(strings)))

    def __len__(self) -> int:
        return len(self.strings)

    def row_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one row of tensor `name`."""
        return self._first_filled_part().row_shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor `name`."""
        return self._first_filled_part().dtype(name)

    def _first_filled_part(self) -> _RowFile:
        """A part with rows (a part whose images were all unreadable has none, and no row shape)."""
        return next((part for part in self.parts if part.num_rows), self.parts[0])

    def rows(self, name: str, indices: Sequence[int]) -> torch.Tensor:
        """Rows `indices` of tensor `name`, (len(indices), *row_shape), read from disk into a new CPU tensor."""
        out = torch.empty((len(indices), *self.row_shape(name)), dtype=self.dtype(name))
        flat = out.view(torch.uint8).view(len(indices), -1) if len(indices) else out
        for k, index in enumerate(indices):
            part, row = self._part_of_row[index]
            self.parts[part].read_row(name, row, flat[k])
        return out


class _RowFile:
    """One safetensors file whose tensors are read a row at a time (`os.preadv` at the row's byte offset).

    The file is opened lazily in each process (data-loader workers included) and never pickled.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        self._data_start = 8 + header_size
        self._tensors = {name: info for name, info in header.items() if name != "__metadata__"}
        self.num_rows = int(header.get("__metadata__", {}).get("rows", 0))
        self._fd: int | None = None
        self._pid = 0

    def row_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name]["shape"][1:])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._tensors[name]["dtype"]]

    def read_row(self, name: str, row: int, into: torch.Tensor) -> None:
        """Read row `row` of tensor `name` into `into`, a contiguous uint8 tensor of the row's size."""
        begin, _ = self._tensors[name]["data_offsets"]
        size = into.numel()
        got = os.preadv(self._descriptor(), [memoryview(into.numpy())], self._data_start + begin + row * size)
        if got != size:
            raise OSError(f"{self.path}: short read of row {row} of {name!r} ({got} of {size} bytes); damaged cache")

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": 0}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
