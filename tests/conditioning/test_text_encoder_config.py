"""TextEncoderConfig validates its values and loads through the project's strict YAML loader."""

import pytest

from conditioning import TextEncoderConfig
from ldm.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"hidden_size": 100, "num_heads": 3}, "hidden_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"clip_skip": 2, "num_layers": 2}, "clip_skip"),
        ({"clip_skip": -1}, "clip_skip"),
        ({"max_length": 78}, "max_length"),
        ({"p_uncond": 1.5}, "p_uncond"),
        ({"pretrained": " "}, "pretrained"),
    ],
)
def test_invalid_values_are_errors_naming_the_key(fields, key):
    with pytest.raises(ValueError, match=f"^{key}: "):
        TextEncoderConfig(**fields)


def test_pretrained_encoders_check_clip_skip_when_loaded_not_in_the_config():
    assert TextEncoderConfig(pretrained="runwayml/stable-diffusion-v1-5", clip_skip=2).clip_skip == 2


def test_loads_from_yaml_with_errors_naming_file_and_key(tmp_path):
    path = tmp_path / "text.yaml"
    path.write_text("clip_skip: 1\np_uncond: 0.2\ndtype: bfloat16\n")
    config = load_config(TextEncoderConfig, path)
    assert (config.clip_skip, config.p_uncond, config.dtype) == (1, 0.2, "bfloat16")
    path.write_text("p_uncond: 2.0\n")
    with pytest.raises(ConfigError, match=r"text\.yaml.*p_uncond"):
        load_config(TextEncoderConfig, path)
    path.write_text("hidden: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'hidden'"):
        load_config(TextEncoderConfig, path)


def test_conditioning_never_imports_ldm():
    from pathlib import Path

    import conditioning

    for source in Path(conditioning.__file__).parent.glob("*.py"):
        text = source.read_text()
        assert "import ldm" not in text and "from ldm" not in text, source
