"""DataConfig validation and build_dataset for each split."""

import pytest

from ldm.config import ConfigError, load_config
from ldm.data import DataConfig, ShapesDataset, build_dataset


def test_defaults_build_the_shapes_splits():
    cfg = DataConfig()
    train, heldout = build_dataset(cfg, "train"), build_dataset(cfg, "heldout")
    assert isinstance(train, ShapesDataset) and (len(train), train.split) == (cfg.num_samples, "train")
    assert (len(heldout), heldout.split, heldout.resolution) == (cfg.heldout_samples, "heldout", 32)
    with pytest.raises(ValueError, match="split must be one of train, heldout"):
        build_dataset(cfg, "test")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("resolution=4", "resolution"),
        ("num_samples=0", "num_samples"),
        ("shuffle_buffer=-1", "shuffle_buffer"),
        ("source=webdataset", "train_path"),
        ("source=tfrecord", "source"),
        ("colour=red", "colour"),
        ("shapes=[circle, star]", "shapes"),
        ("colors=[red]", "colors"),
    ],
)
def test_bad_values_are_errors_naming_the_key(tmp_path, override, key):
    path = tmp_path / "data.yaml"
    path.write_text("resolution: 32\n")
    with pytest.raises(ConfigError, match=key) as info:
        load_config(DataConfig, path, [override])
    assert str(path) in str(info.value)
