"""Stage 2 under FSDP (fsdp_version 2: accelerate's `fully_shard`) on 2 CPU processes over gloo, launched with
configs/accelerate/fsdp.yaml.

accelerate turns FSDP on only for GPU-like devices: on CPU processes (ACCELERATE_USE_CPU) it keeps a MULTI_CPU
state and trains with DDP, ignoring the FSDP settings. torch's FSDP2 itself runs on CPU over gloo, so the run's
`sitecustomize` (FSDP_ON_CPU below) turns accelerate's state to FSDP where the launcher asked for it. The rest is
accelerate's and torch's own code: `fully_shard` on the U-Net's blocks, the sharded optimizer, the checkpoint
(pytorch_model_fsdp.bin holds the whole weights), `get_state_dict`. The run writes every file it opens for
writing to a log (tests/training/launch.py), so the test sees which process wrote what.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from ldm.config import load_config
from ldm.data import build_dataset
from ldm.training import DiffusionExperimentConfig
from ldm.training.diffusion_stage import build_networks, train_only_caption_rows
from tests.fault_run import different_tensors
from tests.training.launch import REPO_ROOT, WRITE_HOOK, check_main_process_writes, free_port, rank_records, writes

pytestmark = pytest.mark.training

STEPS = 4
EMA_DECAY = 0.9
FSDP_CONFIG = REPO_ROOT / "configs" / "accelerate" / "fsdp.yaml"
TABLE = "text_encoder.model.embeddings.token_embedding"  # the token table (its caption rows train)

# accelerate's AcceleratorState copies PartialState's fields in whenever it is constructed, so the FSDP type is set
# in both; the plugin is the one accelerate built from the launcher's FSDP_* variables.
FSDP_ON_CPU = """
import accelerate.state as _state
from accelerate.utils import DistributedType as _Type

_init = _state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == _Type.MULTI_CPU:
        self.distributed_type = _state.PartialState._shared_state["distributed_type"] = _Type.FSDP
        self.fsdp_plugin = fsdp_plugin


_state.AcceleratorState.__init__ = _fsdp_on_cpu
"""


def run_fsdp(args: list[str], out: Path, tmp: Path, timeout: float = 240) -> str:
    """`ldm --log-level DEBUG ARGS` under `accelerate launch --config_file fsdp.yaml` with 2 CPU processes; returns
    stderr. A run that has not finished within `timeout` seconds (a collective some rank never joins) is killed
    with every process it started."""
    hook_dir = tmp / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(WRITE_HOOK + FSDP_ON_CPU, encoding="utf-8")
    env = os.environ | {
        "PYTHONPATH": f"{hook_dir}{os.pathsep}{REPO_ROOT}",
        "LDM_TEST_WATCH_DIR": str(out.resolve()),
        "LDM_TEST_WRITE_LOG": str(tmp / "writes-2"),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
    }
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    launch += ["--num_processes", "2", "--main_process_port", str(free_port())]
    command = [*launch, "-m", "ldm", "--log-level", "DEBUG", *args]
    proc = subprocess.Popen(command, env=env, cwd=tmp, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: the launcher and both workers
        proc.communicate()
        pytest.fail(f"the FSDP run did not finish within {timeout} s (a rank waits in a collective)")
    assert proc.returncode == 0, stderr[-6000:]
    return stderr


def write_tiny_vae(folder: Path) -> Path:
    """A random f=2 AutoencoderKL saved as a stage-1 output folder (as tests/training/conftest.py's tiny_vae_dir)."""
    torch.manual_seed(0)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
    vae = AutoencoderKL(
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16, **blocks
    )
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def diffusion_config(tmp: Path, vae: Path) -> Path:
    """4 steps of stage 2 on 16 px shapes with an EMA and the text encoder trained with the U-Net (so both are
    sharded; by the stage's defaults, only the captions' token rows of its table train), a checkpoint after every
    step, a grid every 2 steps (drawn by an unsharded copy holding those rows)."""
    config = {
        "autoencoder": str(vae),
        "data": {"source": "shapes", "resolution": 16, "num_samples": 32, "heldout_samples": 8},
        "text_encoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "unet": {"block_out_channels": [32, 32], "cross_attention": [True, True], "attention_head_dim": 16},
        "train": {"steps": STEPS, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "sample_every": 2},
        "validation": {"prompts": ["a red circle"], "images_per_prompt": 1, "num_inference_steps": 2},
    }
    config["text_encoder"] |= {"max_length": 16, "frozen": False}
    config["train"] |= {"checkpoint_every": 1, "keep_checkpoints": STEPS, "num_threads": 1, "ema_decay": EMA_DECAY}
    path = tmp / "dm.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The finished 2-process FSDP run: (its output folder, its config, its stderr, the folder of its write log)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    config = diffusion_config(tmp, write_tiny_vae(tmp / "vae"))
    out = tmp / "dm"
    stderr = run_fsdp(["train-diffusion", "--config", str(config), "--output-dir", str(out)], out, tmp)
    return out, config, stderr, tmp


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:07d}"


def trained_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The whole denoiser state of a checkpoint (accelerate gathers FSDP's shards into pytorch_model_fsdp.bin)."""
    return torch.load(checkpoint(out, step) / "pytorch_model_fsdp.bin", weights_only=True)


def ema_weights(out: Path, step: int, names: list[str]) -> dict[str, torch.Tensor]:
    """The EMA of a checkpoint by parameter name (shadow.i is the i-th trained parameter)."""
    shadow = load_file(checkpoint(out, step) / "ema.safetensors")
    return {name: shadow[f"shadow.{i}"] for i, name in enumerate(names)}


def test_fsdp_stage_2_averages_samples_and_exports_whole_ema_weights(fsdp_run):
    out, config, stderr, tmp = fsdp_run
    assert {rank for rank, _ in rank_records(stderr)} == {0, 1}  # two processes trained
    assert (checkpoint(out, STEPS) / "pytorch_model_fsdp.bin").is_file()  # accelerate saved through FSDP
    cfg = load_config(DiffusionExperimentConfig, config)
    nets = build_networks(cfg, torch.device("cpu"))
    train_only_caption_rows(nets.text_encoder, cfg, build_dataset(cfg.data, "train"))  # as the stage does
    denoiser = nets.denoiser
    names = [name for name, p in denoiser.named_parameters() if p.requires_grad]
    assert TABLE + ".rows" in names and TABLE + ".weight" not in names  # only the captions' rows trained
    full_shapes = {name: p.shape for name, p in denoiser.named_parameters()}

    # Each step's EMA is the last one moved towards that step's whole trained weights, at the warmup decay.
    for step in range(2, STEPS + 1):
        before, after = ema_weights(out, step - 1, names), ema_weights(out, step, names)
        weights, decay = trained_weights(out, step), min(EMA_DECAY, step / (9 + step))  # (1 + n) / (10 + n)
        assert {name: after[name].shape for name in names} == {name: full_shapes[name] for name in names}
        for name in names:
            torch.testing.assert_close(after[name], torch.lerp(before[name], weights[name], 1 - decay), msg=name)

    # The exported model folder holds the whole final EMA (the U-Net and the text encoder trained with it).
    ema, weights = ema_weights(out, STEPS, names), trained_weights(out, STEPS)
    exported = {
        f"{prefix}.{name}": tensor
        for prefix, file in (("unet", "unet/diffusion_pytorch_model"), ("text_encoder.model", "text_encoder/model"))
        for name, tensor in load_file(out / "pipeline" / f"{file}.safetensors").items()
    }
    # The caption rows come back merged into a plain CLIP token table: the averaged rows at their token ids,
    # the initial (never trained) table elsewhere.
    rows, ids = ema.pop(TABLE + ".rows"), denoiser.text_encoder.model.get_input_embeddings().ids
    table = exported.pop(TABLE + ".weight")
    torch.testing.assert_close(table[ids], rows, rtol=0, atol=0)
    untouched = torch.ones(len(table), dtype=torch.bool).index_fill_(0, ids, False)
    assert torch.equal(table[untouched], weights[TABLE + ".weight"][untouched])
    names.remove(TABLE + ".rows")
    assert {name: tensor.shape for name, tensor in exported.items()} == {
        name: shape for name, shape in full_shapes.items() if not name.startswith(TABLE)
    }
    assert all(torch.equal(exported[name], ema[name]) for name in names)
    assert not any(torch.equal(exported[name], weights[name]) for name in names)  # the average, not the last step

    # The grids were drawn, and only the main process wrote anything but its own RNG state.
    written = set(check_main_process_writes(writes(tmp, 2), out))
    assert {"samples/step_0000002.png", "samples/step_0000004.png", "samples/final.png"} <= written


def test_an_fsdp_checkpoint_resumes_its_sharded_ema_bitwise(fsdp_run, tmp_path):
    out, config, _, _ = fsdp_run
    resumed = tmp_path / "resumed"
    args = ["train-diffusion", "--config", str(config), "--output-dir", str(resumed)]
    stderr = run_fsdp([*args, "--resume", str(checkpoint(out, 2))], resumed, tmp_path)
    assert "step_0000002" in stderr  # accelerate's "Loading states from ..."
    for name in ("ema.safetensors", "data_state.safetensors"):
        assert different_tensors(checkpoint(out, STEPS) / name, checkpoint(resumed, STEPS) / name) == [], name
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert different_tensors(out / "pipeline" / name, resumed / "pipeline" / name) == [], name
