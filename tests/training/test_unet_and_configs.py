from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.config import ConfigError, load_config, to_dict
from ldm.training import DiffusionExperimentConfig
from ldm.unet import UNetConfig, build_unet

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_cpu_config_equals_the_defaults():
    loaded = load_config(DiffusionExperimentConfig, CONFIGS / "diffusion_shapes_cpu.yaml")
    assert to_dict(loaded) == to_dict(DiffusionExperimentConfig())


@pytest.mark.parametrize("name", ["diffusion_sd_256.yaml", "diffusion_sd_512.yaml"])
def test_gpu_configs_load_with_sd_sized_unets(name):
    cfg = load_config(DiffusionExperimentConfig, CONFIGS / name)
    assert list(cfg.unet.block_out_channels) == [320, 640, 1280, 1280]
    assert cfg.train.mixed_precision == "bf16" and cfg.text_encoder.max_length == 77
    assert cfg.data.resolution // 8 % cfg.unet.downsampling_factor == 0


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet:\n  cross_attention: [true]\n")
    with pytest.raises(ConfigError, match="cross_attention"):
        load_config(DiffusionExperimentConfig, bad)
    with pytest.raises(ConfigError, match=r"train\.lr_schedule"):
        load_config(DiffusionExperimentConfig, None, ["train.lr_schedule=linear"])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(DiffusionExperimentConfig, None, ["train.ema_decay=1.5"])


def test_unet_puts_cross_attention_where_the_config_says():
    cfg = UNetConfig(block_out_channels=(32, 64), cross_attention=(False, True), attention_head_dim=16)
    unet = build_unet(cfg, in_channels=4, out_channels=8, cross_attention_dim=24, sample_size=8)
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert unet.config.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D")
    assert unet.config.out_channels == 8 and unet.config.cross_attention_dim == 24
    assert list(unet.config.attention_head_dim) == [2, 4]  # heads = width / channels per head


def test_pretrained_unet_with_the_wrong_sizes_is_refused(tmp_path):
    cfg = UNetConfig(block_out_channels=(32, 64), attention_head_dim=16)
    build_unet(cfg, in_channels=4, out_channels=4, cross_attention_dim=24, sample_size=8).save_pretrained(
        tmp_path / "unet"
    )
    loaded = build_unet(
        UNetConfig(pretrained=str(tmp_path)), in_channels=4, out_channels=4, cross_attention_dim=24, sample_size=8
    )
    assert loaded.config.block_out_channels == (32, 64) or list(loaded.config.block_out_channels) == [32, 64]
    with pytest.raises(ValueError, match="out_channels is 4, needs 8"):
        build_unet(
            UNetConfig(pretrained=str(tmp_path)), in_channels=4, out_channels=8, cross_attention_dim=24, sample_size=8
        )


def test_pooled_text_adds_the_whole_prompt_to_the_timestep_embedding(tmp_path):
    cfg = UNetConfig(
        block_out_channels=(32, 64), cross_attention=(False, True), attention_head_dim=16, pooled_text=True
    )
    torch.manual_seed(0)
    unet = build_unet(cfg, in_channels=4, out_channels=4, cross_attention_dim=32, sample_size=8).eval()
    assert unet.config.addition_embed_type == "text" and unet.config.addition_embed_type_num_heads == 2
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    with torch.no_grad():
        # With cross-attention cut (its output projections zeroed), the text still reaches the output: pooled.
        for block in unet.down_blocks[1:2] + unet.up_blocks[:1] + [unet.mid_block]:
            for attention in block.attentions:
                attention.proj_out.weight.zero_()
                attention.proj_out.bias.zero_()
        a = unet(x, t, encoder_hidden_states=text).sample
        b = unet(x, t, encoder_hidden_states=text.flip(0)).sample
    assert (a - b).abs().max() > 1e-3
    unet.save_pretrained(tmp_path / "unet")  # a plain diffusers folder: diffusers alone loads it
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, encoder_hidden_states=text).sample, a)
