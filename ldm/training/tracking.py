"""Experiment tracking: the `train.log_with` setting mapped onto accelerate's trackers.

`train.log_with` is "tensorboard" (the default), "wandb" (the optional extra) or "none". Every file a tracker
writes goes under the run's logs folder (OUTPUT_DIR/logs), never the current directory:
- tensorboard: `logs/<project>/events.out.tfevents.*` holds the scalars; the config goes in as hparams, in a
  timestamped subfolder beside them (with accelerate's `hparams.yml`).
- wandb: `logs/wandb/run-*/` (online) or `logs/wandb/offline-run-*/` (WANDB_MODE=offline, no network; upload it
  later with `wandb sync`). The mode and every other WANDB_* setting come from the environment, except the
  folder, which is always the logs folder.

Both functions are called on every process: accelerate starts the trackers and logs on the main process only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm.config import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

TRACKERS = ("tensorboard", "wandb", "none")

# What every tracker takes as a config value (TensorBoard's add_hparams is the strictest).
Scalar = int | float | str | bool


def accelerator_log_with(log_with: str) -> str | None:
    """What to pass as `Accelerator(log_with=...)` for `train.log_with` ("none" -> None).

    Raises before any training work if the value is unknown or its package is missing: accelerate itself only
    warns and trains without a tracker.
    """
    if log_with not in TRACKERS:
        raise ValueError(f"train.log_with: unknown tracker {log_with!r}; valid values: {', '.join(TRACKERS)}")
    if log_with == "none":
        return None
    if log_with == "wandb":
        _require_wandb()
    return log_with


def start_tracking(
    accelerator: Accelerator, log_with: str, project: str, config: Mapping[str, Any], logging_dir: Path
) -> None:
    """Start the run's tracker (nothing for "none") with the config recorded as flat "section.key" scalars.

    `accelerator` must have been made with `log_with=accelerator_log_with(log_with)` and, for tensorboard,
    `ProjectConfiguration(logging_dir=logging_dir)`; wandb is pointed at `logging_dir` here.
    """
    accelerator_log_with(log_with)
    if log_with == "none":
        return
    tracked = [str(tracker) for tracker in accelerator.log_with]
    if tracked != [log_with]:
        raise ValueError(
            f"train.log_with is {log_with!r} but the Accelerator tracks with {tracked or 'nothing'}; "
            f"create it with Accelerator(log_with=accelerator_log_with({log_with!r}))"
        )
    logging_dir = Path(logging_dir)
    init_kwargs: dict[str, dict[str, Any]] = {}
    if log_with == "tensorboard" and Path(accelerator.logging_dir).resolve() != logging_dir.resolve():
        raise ValueError(
            f"logging_dir {str(logging_dir)!r} differs from the Accelerator's ProjectConfiguration logging_dir "
            f"{str(accelerator.logging_dir)!r}, where TensorBoard writes; pass the same folder to both"
        )
    if log_with == "wandb":
        if accelerator.is_main_process:
            logging_dir.mkdir(parents=True, exist_ok=True)  # older wandb falls back to a temp dir if it is missing
        # `dir` takes precedence over WANDB_DIR; WANDB_MODE (online / offline / disabled) is left to the environment.
        init_kwargs["wandb"] = {"dir": str(logging_dir)}
    accelerator.init_trackers(project, config=flat_config(config), init_kwargs=init_kwargs)


def flat_config(config: Mapping[str, Any]) -> dict[str, Scalar]:
    """The nested config as {"section.key": value}; values other than int/float/str/bool (lists, tuples, None,
    paths) become their `str`, since TensorBoard's hparams reject them."""
    flat: dict[str, Scalar] = {}
    _flatten(config, "", flat)
    return flat


def _flatten(config: Mapping[str, Any], prefix: str, flat: dict[str, Scalar]) -> None:
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, f"{name}.", flat)
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)


def _require_wandb() -> None:
    """Raise the actionable error if wandb cannot be imported (or accelerate cannot see it)."""
    from accelerate.utils import is_wandb_available

    try:
        import wandb  # noqa: F401  (imported only to prove it imports)
    except ImportError as err:
        reason = str(err)
    else:
        if is_wandb_available():
            return
        reason = "accelerate cannot find the wandb package"
    raise ConfigError(
        f'train.log_with = "wandb" needs the wandb package ({reason}): pip install "latent-diffusion-lab[wandb]", '
        'or set train.log_with to "tensorboard" or "none"',
    )
