"""The held-out split `ldm evaluate --data CONFIG` measures a model on: reading CONFIG, checking that its source
has a held-out split at a size the model can draw, and reading the split's first N items in batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.config import ConfigError, from_dict
from ldm.data import DataConfig, build_dataset, collate_examples

# A bare data section may leave train_path out (DataConfig requires it for file sources): the evaluation
# reads only the held-out split, and this placeholder says so wherever the resolved config is recorded.
TRAIN_PATH_NOT_READ = "(not read: ldm evaluate reads only data.heldout_path)"


def training_config_sections() -> frozenset[str]:
    """The top-level keys of a training config of either stage (what may stand beside its `data:` section)."""
    from ldm.training.autoencoder_config import AutoencoderExperimentConfig
    from ldm.training.diffusion_config import DiffusionExperimentConfig

    stages = (AutoencoderExperimentConfig, DiffusionExperimentConfig)
    return frozenset(f.name for stage in stages for f in dataclasses.fields(stage))


@dataclass(frozen=True)
class HeldoutData:
    """The held-out split a `--data` config names: its `DataConfig`, the file it came from, and the dataset."""

    config: DataConfig
    dataset: Dataset | IterableDataset
    source: str  # the config file

    def describe(self) -> str:
        """Where the held-out images come from, for the report, e.g. "imagefolder data/heldout at 64 px"."""
        cfg = self.config
        where = "generated shapes scenes" if cfg.source == "shapes" else f"{cfg.source} {cfg.heldout_path}"
        return f"{where} at {cfg.resolution} px (config {self.source})"


def load_data_config(path: str | Path) -> DataConfig:
    """The `DataConfig` of the YAML file `path`: a whole training config of either stage (such as the
    config.yaml a run writes into its OUTPUT_DIR), whose `data:` section is read, or a bare data section (the
    keys of `DataConfig`). ConfigError naming the file and the key for anything else.

    Beside `data:`, only the sections of a training config may stand; they are not read (the evaluation
    needs no autoencoder path or optimizer setting, and checking them would fail runs moved elsewhere).
    """
    raw = _read_mapping(Path(path))
    source = str(path)
    if "data" in raw:
        sections = training_config_sections()
        unknown = sorted(set(raw) - sections)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key {unknown[0]!r} beside `data:`; a training config has only "
                f"{', '.join(sorted(sections))} (or give a bare data section)"
            )
        return from_dict(DataConfig, raw["data"], source=source, prefix="data")
    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    if not set(raw) & data_keys:
        found = f"; it has {', '.join(map(repr, sorted(map(str, raw))))}" if raw else "; it is empty"
        raise ConfigError(
            f"{source}: no `data:` section and none of the data keys ({', '.join(sorted(data_keys))}){found}. "
            "Give a training config (e.g. the config.yaml a run writes) or its data section"
        )
    section = dict(raw)
    if section.get("source", "shapes") != "shapes" and not section.get("train_path"):
        section["train_path"] = TRAIN_PATH_NOT_READ
    return from_dict(DataConfig, section, source=source, prefix="data")


def check_heldout_source(cfg: DataConfig, source: str) -> None:
    """ValueError naming the key when `cfg` has no held-out images to evaluate on (before any work)."""
    if cfg.source == "latents":
        raise ValueError(
            f"{source}: data.source: 'latents' holds precomputed latents, no held-out images; evaluate on the "
            "image source they were made from (imagefolder or webdataset, with data.heldout_path)"
        )
    if cfg.source != "shapes" and not cfg.heldout_path:
        raise ValueError(
            f"{source}: data.heldout_path: required to evaluate on source {cfg.source!r} (the held-out "
            f"{'folder with metadata.jsonl' if cfg.source == 'imagefolder' else '.tar shards'}; the training "
            "images would flatter the model)"
        )


def check_resolution(resolution: int, size_multiple: int, source: str) -> None:
    """ValueError naming data.resolution when the model cannot draw images of that side."""
    if resolution % size_multiple:
        lower = max(size_multiple, resolution // size_multiple * size_multiple)
        raise ValueError(
            f"{source}: data.resolution: the model draws sides that are multiples of {size_multiple} (its VAE "
            f"factor times its U-Net's downsampling), and {resolution} is not; use e.g. {lower} or "
            f"{lower + size_multiple}"
        )


def open_heldout(path: str | Path) -> HeldoutData:
    """Read the config at `path`, check it has a held-out split and open that split (an image folder is
    checked image by image here). ConfigError, ValueError or FileNotFoundError naming the file and key."""
    cfg = load_data_config(path)
    check_heldout_source(cfg, str(path))
    try:
        dataset = build_dataset(cfg, "heldout")
    except FileNotFoundError as err:  # a missing folder or shards
        raise FileNotFoundError(f"{path}: data.heldout_path: {err}") from err
    except ValueError as err:  # e.g. a folder with no usable image
        raise ValueError(f"{path}: {err}") from err
    return HeldoutData(cfg, dataset, str(path))


def heldout_batches(dataset: Dataset | IterableDataset, count: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """The dataset's first `count` items in order, as `collate_examples` batches (the last one trimmed). Items
    that fail to load at run time are skipped (the dataset logs them), so later items take their place."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_examples)  # no shuffle: held out
    seen = 0
    for batch in loader:
        take = min(len(batch["captions"]), count - seen)
        if take == 0:  # a batch of images that all failed to load
            continue
        yield {"pixel_values": batch["pixel_values"][:take], "captions": batch["captions"][:take]}
        seen += take
        if seen >= count:
            return


def _read_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of the YAML file `path` (yaml.safe_load); ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    return loaded
