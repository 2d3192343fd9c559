"""Training checkpoints: accelerate's full state (weights as safetensors) plus the trainer's own state.

A checkpoint is written into a hidden temporary folder beside its target and renamed into place once
complete, so a crash during a save leaves the previous checkpoints intact and no half folder that
`--resume latest` could pick. Only the last `keep` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TEMP_PREFIX = ".incomplete-"  # never matches _STEP_DIR, so an interrupted save is invisible to resume
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    """OUTPUT_DIR/checkpoints."""
    return Path(output_dir) / "checkpoints"


def step_folder(output_dir: str | Path, step: int) -> Path:
    """OUTPUT_DIR/checkpoints/step_NNNNNNN, where the checkpoint of `step` lives once complete."""
    return checkpoint_dir(output_dir) / f"step_{step:07d}"


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    extra: Callable[[Path], None] | None = None,
    state: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Save models, optimizers, scaler and RNG states to checkpoints/step_NNNNNNN atomically (all processes
    must call this: accelerate's save_state is collective).

    `extra(folder)` writes anything else the trainer keeps (e.g. its EMA); `state` is recorded in
    trainer_state.json with the step. With `keep`, older checkpoints beyond the last `keep` are deleted,
    only after the new one is complete. Only the main process renames and deletes.
    """
    root = checkpoint_dir(output_dir)
    final = step_folder(output_dir, step)
    temp = root / f"{TEMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        remove_incomplete(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp), safe_serialization=True)
    if extra is not None:
        extra(temp)
    accelerator.wait_for_everyone()  # every rank's files (its RNG states) are in the folder
    if accelerator.is_main_process:
        saved = {"step": step, "saved_at": time.time(), **(state or {})}  # saved_at: what "latest" means
        _write_synced(temp / STATE_FILE, json.dumps(saved))
        publish(temp, final)
        if keep is not None:
            prune_checkpoints(root, keep, step)
    accelerator.wait_for_everyone()
    return final


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes the folder count as complete


def publish(temp: Path, final: Path) -> None:
    """Rename the finished `temp` folder to `final`; an existing `final` (a re-run step) is replaced."""
    if final.exists():
        old = final.with_name(f"{TEMP_PREFIX}old-{final.name}")
        final.rename(old)
        temp.rename(final)
        shutil.rmtree(old)
    else:
        temp.rename(final)


def remove_incomplete(root: Path) -> None:
    """Delete the temporary folders of saves that a crash interrupted."""
    for path in root.glob(f"{TEMP_PREFIX}*") if root.is_dir() else ():
        logger.warning("removing %s: an interrupted checkpoint save", path)
        shutil.rmtree(path)


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under OUTPUT_DIR/checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(root: Path, keep: int, step: int) -> None:
    """Keep the checkpoint of `step` and the `keep - 1` newest before it; delete older ones.

    Checkpoints after `step` (left by a run that was resumed from an earlier one) are not touched.
    """
    older = [path for s, path in complete_checkpoints(root.parent) if s < step]
    for path in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The most recently saved complete checkpoint under OUTPUT_DIR/checkpoints, or None.

    Most recent, not highest step: after a run is resumed from an earlier checkpoint, the higher steps
    its abandoned continuation left behind must not be picked over what the resumed run has saved since.
    """
    found = complete_checkpoints(output_dir)
    return max(found, key=lambda item: (_saved_at(item[1]), item[0]))[1] if found else None


def _saved_at(folder: Path) -> float:
    """When the checkpoint in `folder` was completed (0 for checkpoints written before this was recorded)."""
    return float(json.loads((folder / STATE_FILE).read_text(encoding="utf-8")).get("saved_at", 0.0))


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


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore the state saved in `path` into the prepared objects (and the RNGs); returns trainer_state.json."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
