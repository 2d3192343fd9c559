"""`build_dataset`: the dataset a `DataConfig` describes, for the train or held-out split.

The one module that picks between the sources; none of them imports it, so `ldm.data` has no import circle.
"""

from __future__ import annotations

from torch.utils.data import Dataset, IterableDataset

from ldm.data.config import DataConfig

DATASET_SPLITS = ("train", "heldout")


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset | IterableDataset:
    """The dataset `cfg` describes for `split` ("train" or "heldout").

    Held-out data is prepared deterministically (centre crop, no flip, no shuffling) so evaluation
    numbers are comparable between runs.
    """
    if split not in DATASET_SPLITS:
        raise ValueError(f"split must be one of {', '.join(DATASET_SPLITS)}, got {split!r}")
    train = split == "train"
    if cfg.source == "shapes":
        from ldm.data.shapes import ShapesDataset

        size = cfg.num_samples if train else cfg.heldout_samples
        return ShapesDataset(
            size, resolution=cfg.resolution, split=split, seed=cfg.seed, shapes=cfg.shapes, colors=cfg.colors
        )

    path = cfg.train_path if train else cfg.heldout_path
    if cfg.source == "latents":
        if not train:
            raise ValueError("data.source: 'latents' holds no images to evaluate; evaluate with the image source")
        from ldm.data.latent_shards import LatentShardSource

        return LatentShardSource(path, cfg.random_flip, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed)
    if not path:
        key = "train_path" if train else "heldout_path"
        raise ValueError(f"data.{key}: required for the {split} split of source {cfg.source!r}")
    # The held-out split is always evaluated the same way: centre crop, no flip, no shuffle.
    common = {
        "center_crop": cfg.center_crop or not train,
        "random_flip": cfg.random_flip and train,
        "strict": cfg.strict,
    }
    if cfg.source == "imagefolder":
        from ldm.data.image_folder import ImageFolderDataset

        return ImageFolderDataset(
            path, cfg.resolution, caption_column=cfg.caption_column, verify=cfg.verify_images, **common
        )
    from ldm.data.webdataset_source import WebDatasetSource

    urls: str | list[str] = path.split("::") if "::" in path else path
    # Held-out data is evaluated whole by the main process, so no split across ranks (only across workers).
    whole = {} if train else {"rank": 0, "world_size": 1}
    return WebDatasetSource(
        urls, cfg.resolution, shuffle_buffer=cfg.shuffle_buffer if train else 0, seed=cfg.seed, **common, **whole
    )
