"""Training checkpoints: accelerate's full state (weights as safetensors) plus the step, and finding the latest."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    """OUTPUT_DIR/checkpoints."""
    return Path(output_dir) / "checkpoints"


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, extra: Callable[[Path], None] | None = None
) -> Path:
    """Save models, optimizers and RNG states to checkpoints/step_NNNNNNN (all processes must call this).

    `extra(path)` writes anything else the trainer keeps (e.g. its EMA) before the folder is marked complete.
    """
    path = checkpoint_dir(output_dir) / f"step_{step:07d}"
    accelerator.save_state(str(path), safe_serialization=True)
    if extra is not None:
        extra(path)
    if accelerator.is_main_process:
        # Written last: a folder without it is an interrupted save and is never resumed from.
        (path / STATE_FILE).write_text(json.dumps({"step": step}), encoding="utf-8")
    accelerator.wait_for_everyone()
    return path


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under OUTPUT_DIR/checkpoints, or None."""
    root = checkpoint_dir(output_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def resolve_resume(output_dir: str | Path, resume: str) -> Path:
    """`resume` as a checkpoint folder: "latest" (the newest under OUTPUT_DIR/checkpoints) or a path."""
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {checkpoint_dir(output_dir)}")
        return path
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); use 'latest' or a path")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restore the state saved in `path` into the prepared objects; returns the step it was saved at."""
    accelerator.load_state(str(path))
    return int(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["step"])
