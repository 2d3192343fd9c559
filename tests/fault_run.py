"""A tiny training run of either stage that the fault tests start as a subprocess.

Deterministic on the CPU (one thread, torch.use_deterministic_algorithms), and able to stop at a known
point: with --block-after STEP, the first training batch drawn once checkpoints/step_STEP exists writes
the file --marker and waits (for --release to appear, or forever), so a test can signal or kill it there.
Both stages run through the command line (`ldm train-autoencoder` / `ldm train-diffusion`, their messages
included). Usage: python tests/fault_run.py {autoencoder|diffusion} OUT_DIR [options].
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def block_after(step: int, out: Path, marker: Path, release: Path | None) -> None:
    """Make the next batch drawn after checkpoint `step` is complete write `marker` and wait."""
    from ldm.training import training_state
    from ldm.training.checkpoint import STATE_FILE, step_folder

    draw = training_state.DataStream.__next__
    done = False

    def blocking_next(self: training_state.DataStream) -> object:
        nonlocal done
        if not done and (step_folder(out, step) / STATE_FILE).is_file():
            done = True
            marker.write_text(str(os.getpid()), encoding="utf-8")
            while release is None or not release.exists():
                time.sleep(0.02)
        return draw(self)

    training_state.DataStream.__next__ = blocking_next  # type: ignore[method-assign]


def autoencoder_args(out: Path, steps: int, every: int) -> list[str]:
    """`ldm train-autoencoder` on 16 px shapes: 40 images in batches of 8 (5 per epoch), 2 micro-batches per step,
    the discriminator on from step 2, so a resume crosses epochs and restores both optimizers."""
    settings = {
        "data.resolution": 16, "data.num_samples": 40, "data.heldout_samples": 16,
        "model.block_out_channels": "[16,16]", "model.norm_num_groups": 8, "model.sample_size": 16,
        "loss.disc_weight": 0.5, "loss.disc_start": 2, "loss.disc_channels": 8, "loss.disc_layers": 2,
        "train.steps": steps, "train.batch_size": 8, "train.grad_accum": 2, "train.warmup_steps": 2,
        "train.checkpoint_every": every, "train.sample_every": 1000, "train.log_every": 1,
        "train.eval_samples": 16, "train.scale_samples": 16, "train.num_threads": 1,
    }  # fmt: skip
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return ["train-autoencoder", "--output-dir", str(out), *sets]


def diffusion_args(out: Path, steps: int, every: int, vae: Path) -> list[str]:
    """`ldm train-diffusion` on 16 px shapes: 32 images in batches of 8 (4 per epoch), EMA, caption dropout and
    the text encoder trained with the U-Net (the CPU default), so a resume restores both networks and the EMA."""
    settings = {
        "autoencoder": vae, "data.resolution": 16, "data.num_samples": 32, "data.heldout_samples": 8,
        "text_encoder.hidden_size": 32, "text_encoder.num_layers": 1, "text_encoder.num_heads": 2,
        "text_encoder.intermediate_size": 64, "text_encoder.max_length": 16,
        "unet.block_out_channels": "[32,32]", "unet.cross_attention": "[true,true]", "unet.attention_head_dim": 16,
        "train.steps": steps, "train.batch_size": 8, "train.warmup_steps": 2, "train.sample_every": 1000,
        "train.checkpoint_every": every, "train.log_every": 1, "train.num_threads": 1, "train.lr": 1e-3,
        "validation.prompts": "[a red circle]", "validation.images_per_prompt": 1, "validation.num_inference_steps": 2,
    }  # fmt: skip
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return ["train-diffusion", "--output-dir", str(out), *sets]


def stage_args(stage: str, out: Path, steps: int, every: int, vae: Path | None = None) -> list[str]:
    """The `ldm` arguments of a tiny run of `stage` ("autoencoder" or "diffusion", which needs `vae`)."""
    if stage == "autoencoder":
        return autoencoder_args(out, steps, every)
    return diffusion_args(out, steps, every, vae)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=("autoencoder", "diffusion"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--vae", type=Path, help="stage 2: the VAE folder")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--block-after", type=int, default=None)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--release", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if args.block_after is not None:  # under a launch, each rank writes its own marker: MARKER.RANK
        marker = (
            args.marker.with_name(f"{args.marker.name}.{os.environ['RANK']}") if "RANK" in os.environ else args.marker
        )
        block_after(args.block_after, args.out, marker, args.release)
    from ldm.cli import main as ldm_main

    resume = ["--resume", args.resume] if args.resume else []
    extra = [arg for override in args.overrides for arg in ("--set", override)]
    return ldm_main([*stage_args(args.stage, args.out, args.steps, args.checkpoint_every, args.vae), *extra, *resume])


# Helpers for the tests that drive this script.
ROOT = Path(__file__).resolve().parents[1]


def launch(*args: str, processes: int = 1, port: int = 0) -> subprocess.Popen:
    """Start this script on the checkout it belongs to (its code wins over any installed copy); with
    `processes` > 1 under `accelerate launch` on CPU processes (gloo; see tests/training/launch.py for why
    --multi_gpu), talking on `port`."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    if processes > 1:
        env |= {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command = [sys.executable, *launcher, "--main_process_port", str(port), *command[1:]]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 150) -> str:
    """Wait for `process`; its output (the test fails with it if the run did not exit 0)."""
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` exists while `process` runs."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {process.returncode}) before {path} appeared:\n"
                f"{process.stdout.read()[-4000:] if process.stdout else ''}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def different_tensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (in any bit) between two safetensors files, or that only one has."""
    import torch
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    return sorted(
        k for k in left.keys() | right.keys() if k not in left or k not in right or not torch.equal(left[k], right[k])
    )


def _same_bits(a, b) -> bool:  # two tensors; torch is imported lazily here
    import torch

    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


if __name__ == "__main__":
    sys.exit(main())
