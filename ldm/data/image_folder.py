"""A folder of images with captions in `metadata.jsonl`, the diffusers / Hugging Face `imagefolder` layout.

    root/
      metadata.jsonl      {"file_name": "cat.jpg", "text": "a photo of a cat"}   one JSON object per line
      cat.jpg
      more/dog.png

How bad input is handled (`strict=False`, the default):
- a metadata line that is not a JSON object, or has no "file_name", or whose "file_name" leaves the folder
  (absolute, or with ".."): a warning naming file and line, and the line is dropped;
- a metadata line that is not UTF-8: a warning naming file and line; it is read with U+FFFD replacement
  characters and kept (the image is fine, only the caption has lost characters);
- an image that is missing, unreadable, truncated or empty: skipped, with path and reason;
- a missing, null or empty caption: the empty string (an unconditional example), counted.
With `strict=True` each of the first three is an error naming the file (and line) instead, and so is a
folder without `metadata.jsonl` (otherwise every image is used with an empty caption: fine for stage 1, which
reads no captions; stage 2 refuses such a folder, see `has_captions`).

Where skips are found: with `verify=True` (the default) every image is decoded once at construction, in
the main process, so the summary is complete before training starts and identical in every worker.
A file that fails later anyway (changed on disk, or `verify=False`) makes `__getitem__` return None,
which `collate_examples` drops; it is logged as a warning at once by the process that hit it, and
listed in that process's `summary()` (with data-loader workers, the main process does not see it).
Call `log_summary()` at the end of each epoch to report the whole picture.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldm.data.buckets import Size, describe_buckets, nearest_bucket
from ldm.data.images import IMAGE_EXTENSIONS, describe_error, load_pixels, upright_size, utf8_problem

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"


@dataclass
class FolderSummary:
    """What an image folder contained and what was done about its problems."""

    root: str
    rows: int = 0  # images listed (metadata rows with a file_name, or image files found)
    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), found at construction
    runtime_skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), in this process
    missing_captions: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number in metadata.jsonl, reason)

    @property
    def clean(self) -> bool:
        """True when nothing was skipped and no metadata line was bad."""
        return not (self.skipped or self.runtime_skipped or self.bad_lines)

    def format(self, max_listed: int = 20) -> str:
        """A multi-line, human-readable report; long lists are cut after `max_listed` entries."""
        lines = [
            f"image folder {self.root}: kept {self.kept} of {self.rows} images; "
            f"skipped {len(self.skipped)} at start-up, {len(self.runtime_skipped)} while loading; "
            f"{self.missing_captions} with missing or empty captions (used as unconditional); "
            f"{len(self.bad_lines)} bad metadata lines"
        ]
        entries = [f"  skipped {path}: {reason}" for path, reason in self.skipped + self.runtime_skipped]
        entries += [f"  {self.root}/{METADATA_FILE}:{line}: {reason}" for line, reason in self.bad_lines]
        lines += entries[:max_listed]
        if len(entries) > max_listed:
            lines.append(f"  ... and {len(entries) - max_listed} more")
        return "\n".join(lines)


class ImageFolderDataset(Dataset):
    """Captioned images from a folder; items are `{"pixel_values": (3, R, R) in [-1, 1], "caption": str}`.

    Images are made RGB (alpha over white, 16-bit grey rescaled, EXIF orientation applied), resized so the
    short side is `resolution`, cropped to a square (centred, or random with `center_crop=False`) and
    flipped left-right with probability 1/2 if `random_flip`. See the module docstring for bad input.
    After `set_buckets`, each image is prepared at its aspect-ratio bucket instead (`bucket_of[i]` indexes
    `bucket_sizes`), with the same crop and flip.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        strict: bool = False,
        caption_column: str = "text",
        verify: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root}: not a directory")
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.strict = strict
        self.caption_column = caption_column
        self._summary = FolderSummary(root=str(self.root))
        self.has_captions = (self.root / METADATA_FILE).is_file()  # False: every caption is "" (no metadata.jsonl)
        rows = self._read_metadata()
        self._summary.rows = len(rows)
        rows = self._drop_missing_files(rows)
        if verify:
            rows = self._drop_unreadable(rows)
        self.records: list[tuple[Path, str | list[str]]] = rows
        self.bucket_sizes: list[Size] | None = None  # set by `set_buckets`
        self.bucket_of: list[int] | None = None
        self._summary.kept = len(rows)
        if not rows:
            raise ValueError(f"image folder {self.root}: no usable images\n{self._summary.format()}")
        logger.log(logging.INFO if self._summary.clean else logging.WARNING, "%s", self._summary.format())

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, caption = self.records[index]
        size = self.resolution if self.bucket_sizes is None else self.bucket_sizes[self.bucket_of[index]]
        try:
            pixels = load_pixels(path, size, self.center_crop, self.random_flip)
        except Exception as err:  # decoders of untrusted files raise many types (OSError, ValueError, ...)
            if self.strict:
                raise OSError(f"{path}: cannot load image ({describe_error(err)})") from err
            logger.warning("skipping %s: %s", path, describe_error(err))
            self._summary.runtime_skipped.append((str(path), describe_error(err)))
            return None
        if isinstance(caption, list):  # several captions for one image: a random one each time
            caption = caption[int(torch.randint(len(caption), ()).item())]
        return {"pixel_values": pixels, "caption": caption}

    def set_buckets(self, sizes: list[Size]) -> None:
        """Prepare each image at the bucket of `sizes` ((width, height) pairs) nearest its aspect ratio.

        Every image's header is read once (in threads) for its upright size; an image whose header cannot be
        read is skipped as at start-up (strict: an error). Sets `bucket_sizes` and `bucket_of`, by which the
        loader batches (`ldm.data.buckets.BucketBatchSampler`).
        """

        def read(path: Path) -> tuple[int, int] | str:
            try:
                return upright_size(path)
            except Exception as err:  # see __getitem__
                return describe_error(err)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(read, [path for path, _ in self.records])
            found = list(tqdm(results, total=len(self.records), desc="sizing images", disable=len(self.records) < 1000))
        kept, bucket_of = [], []
        for record, size in zip(self.records, found, strict=True):
            if isinstance(size, str):
                self._skip(record[0], size)
                continue
            kept.append(record)
            bucket_of.append(nearest_bucket(*size, sizes))
        if not kept:
            raise ValueError(f"image folder {self.root}: no usable images\n{self._summary.format()}")
        self.records, self.bucket_sizes, self.bucket_of = kept, list(sizes), bucket_of
        self._summary.kept = len(kept)
        logger.info("image folder %s: %s", self.root, describe_buckets(sizes, bucket_of))

    def summary(self) -> FolderSummary:
        """The report of this process: start-up skips, bad lines, missing captions, and runtime skips seen here."""
        return self._summary

    def log_summary(self) -> None:
        """Log the summary (warning level if anything was skipped); call it at the end of each epoch."""
        logger.log(logging.INFO if self._summary.clean else logging.WARNING, "%s", self._summary.format())

    def _read_metadata(self) -> list[tuple[Path, str | list[str]]]:
        """(path, caption) rows from metadata.jsonl, or every image file with an empty caption if there is none."""
        metadata = self.root / METADATA_FILE
        if not self.has_captions:
            if self.strict:
                raise FileNotFoundError(
                    f"{metadata}: not found (strict mode); add one JSON line per image "
                    '({"file_name": ..., "text": ...}), or set data.strict: false to use the images without captions'
                )
            logger.warning("%s not found: using every image under %s, without captions", metadata, self.root)
            files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self._summary.missing_captions = len(files)
            return [(p, "") for p in files]
        rows: list[tuple[Path, str | list[str]]] = []
        with metadata.open("rb") as f:  # bytes: a line that is not UTF-8 is reported by number, not a crash
            for line_no, raw in enumerate(f, start=1):
                line, problem = _decode_line(raw, first=line_no == 1)
                if problem:
                    self._bad_line(metadata, line_no, problem)
                if not line.strip():
                    continue
                row, problem = _parse_row(line, self.caption_column)
                if problem:
                    self._bad_line(metadata, line_no, problem)
                if row is None:
                    continue
                file_name, caption = row
                if caption == "":
                    self._summary.missing_captions += 1
                rows.append((self.root / file_name, caption))
        return rows

    def _bad_line(self, metadata: Path, line_no: int, problem: str) -> None:
        if self.strict:
            raise ValueError(f"{metadata}:{line_no}: {problem}")
        logger.warning("%s:%d: %s", metadata, line_no, problem)
        self._summary.bad_lines.append((line_no, problem))

    def _skip(self, path: Path, reason: str) -> None:
        if self.strict:
            raise OSError(f"{path}: cannot load image ({reason})")
        self._summary.skipped.append((str(path), reason))

    def _drop_missing_files(self, rows: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
        kept = []
        for path, caption in rows:
            if path.is_file():
                kept.append((path, caption))
            else:
                self._skip(path, "file not found")
        return kept

    def _drop_unreadable(self, rows: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
        """Decode every image once (in threads: PIL releases the GIL while decoding) and drop the failures."""

        def check(path: Path) -> str | None:
            try:
                load_pixels(path, self.resolution)
            except Exception as err:  # see __getitem__
                return describe_error(err)
            return None

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(check, [path for path, _ in rows])
            reasons = list(tqdm(results, total=len(rows), desc="verifying images", disable=len(rows) < 1000))
        kept = []
        for (path, caption), reason in zip(rows, reasons, strict=True):
            if reason is None:
                kept.append((path, caption))
            else:
                self._skip(path, reason)
        return kept


def _decode_line(raw: bytes, first: bool) -> tuple[str, str | None]:
    """A metadata line as text, and a problem if it was not UTF-8 (then decoded with replacement characters)."""
    try:
        line = raw.decode("utf-8")
        problem = None
    except UnicodeDecodeError as err:
        line = raw.decode("utf-8", errors="replace")
        problem = f"{utf8_problem(raw, err)} (read with replacement characters)"
    return (line.removeprefix("\ufeff") if first else line), problem  # a BOM is not part of the JSON


def _parse_row(line: str, caption_column: str) -> tuple[tuple[str, str | list[str]] | None, str | None]:
    """One metadata line as ((file_name, caption) or None, problem or None).

    A row without a usable file_name is dropped (None); a caption of the wrong type is kept as "" with
    a problem to report. Missing, null and blank captions are "" without a problem (they are counted).
    """
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at column {err.colno})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    file_name = row.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        return None, "missing or empty 'file_name'"
    if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
        return None, f"'file_name' must be a path inside the folder (relative, without '..'), got {file_name!r}"
    caption = row.get(caption_column)
    if caption is None:
        return (file_name, ""), None
    if isinstance(caption, str):
        return (file_name, caption.strip()), None
    if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
        texts = [c.strip() for c in caption if c.strip()]
        return (file_name, texts if len(texts) > 1 else (texts[0] if texts else "")), None
    return (file_name, ""), f"{caption_column!r} must be a string or a list of strings, got {caption!r}"
