"""The model folder on disk: a diffusers Stable Diffusion pipeline folder, plus our sampling defaults.

    model_index.json            StableDiffusionPipeline; safety checker, feature extractor, image encoder null
    vae/                        AutoencoderKL: config.json (with scaling_factor) + diffusion_pytorch_model.safetensors
    unet/                       UNet2DConditionModel: config.json + diffusion_pytorch_model.safetensors
    text_encoder/, tokenizer/   CLIPTextModel (config.json + model.safetensors) and the CLIP tokenizer
    scheduler/                  scheduler_config.json: the noise process (NoiseScheduleConfig)
    ldm_sampling.json           SamplingDefaults; diffusers ignores files it does not know

This module reads and writes the small JSON files and checks that a folder is complete; the pipeline
loads the networks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import diffusers
from safetensors import SafetensorError

from conditioning.config import CLIP_MAX_LENGTH
from ldm.generation.checks import check_bool, check_eta, check_guidance_scale, check_positive_int, check_sampler
from ldm.generation.noise_schedule import NoiseScheduleConfig

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
SAMPLING_DEFAULTS = "ldm_sampling.json"
PIPELINE_CLASS = "StableDiffusionPipeline"
# Folder -> the file that must be in it, and whether it holds weights (which must be safetensors).
COMPONENTS: dict[str, tuple[str, bool]] = {
    "vae": ("config.json", True),
    "unet": ("config.json", True),
    "text_encoder": ("config.json", True),
    "tokenizer": ("tokenizer_config.json", False),
    "scheduler": ("scheduler_config.json", False),
}
# A tokenizer folder without its vocabulary still loads (transformers then builds an empty tokenizer that maps
# every word to one id), so one of these sets of files must be there.
TOKENIZER_VOCABULARIES: tuple[tuple[str, ...], ...] = (("tokenizer.json",), ("vocab.json", "merges.txt"))


@dataclass
class SamplingDefaults:
    """The sampling settings a model folder recommends; `LatentDiffusionPipeline.__call__` falls back to them.

    guidance_scale is w in eps~ = eps_u + w (eps_c - eps_u) (1 = no guidance). 7.5 is Stable Diffusion's
    default; the stage-2 trainer writes the value that works best for the model it trained.
    """

    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    sampler: str = "ddim"  # a name of ldm.diffusion.SAMPLERS
    eta: float = 0.0  # DDIM's noise; 0 = deterministic
    karras_sigmas: bool = False  # visit Karras et al.'s noise levels instead of spaced timesteps

    def __post_init__(self) -> None:  # the request's own checks, so a folder cannot hold what a call refuses
        check_guidance_scale(self.guidance_scale)
        check_positive_int(self.num_inference_steps, "num_inference_steps")
        check_sampler(self.sampler)
        check_eta(self.eta)  # the folder's eta is DDIM's, and other samplers ignore it
        check_bool(self.karras_sigmas, "karras_sigmas")

    def save(self, folder: str | Path) -> Path:
        """Write `folder/ldm_sampling.json`."""
        path = Path(folder) / SAMPLING_DEFAULTS
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SamplingDefaults:
        """Read `folder/ldm_sampling.json`; a folder without one (e.g. a Stable Diffusion download) gets defaults."""
        path = Path(folder) / SAMPLING_DEFAULTS
        if not path.is_file():
            return cls()
        values = read_json(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r}; valid keys are {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err


def check_model_folder(folder: str | Path) -> Path:
    """Raise FileNotFoundError naming the folder and the first missing piece, unless the folder is complete
    (ValueError if model_index.json is not a JSON object)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found")
    if not (folder / MODEL_INDEX).is_file():
        raise FileNotFoundError(f"{folder}: not a model folder, {MODEL_INDEX} is missing")
    read_json(folder / MODEL_INDEX)  # diffusers cannot load the folder without it
    for name, (config_file, has_weights) in COMPONENTS.items():
        if not (folder / name / config_file).is_file():
            raise FileNotFoundError(f"{folder}: component {name!r} is missing ({name}/{config_file} not found)")
        if has_weights and not any((folder / name).glob("*.safetensors")):
            raise FileNotFoundError(
                f"{folder}: component {name!r} has no .safetensors weights (pickled .bin weights are not loaded)"
            )
    if not any(all((folder / "tokenizer" / f).is_file() for f in files) for files in TOKENIZER_VOCABULARIES):
        raise FileNotFoundError(
            f"{folder}: component 'tokenizer' has no vocabulary (tokenizer/tokenizer.json, or tokenizer/vocab.json "
            "and tokenizer/merges.txt)"
        )
    return folder


def write_model_index(folder: str | Path, components: dict[str, tuple[str, str]]) -> Path:
    """Write `model_index.json` for diffusers' StableDiffusionPipeline.

    `components` maps a folder name to its (library, class), e.g. "vae": ("diffusers", "AutoencoderKL").
    The safety checker, feature extractor and image encoder are recorded as absent ([null, null]).
    """
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__}
    index |= {name: list(library_class) for name, library_class in sorted(components.items())}
    index |= {name: [None, None] for name in ("feature_extractor", "image_encoder", "safety_checker")}
    index["requires_safety_checker"] = False
    path = Path(folder) / MODEL_INDEX
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def write_scheduler_config(folder: str | Path, noise_schedule: NoiseScheduleConfig) -> Path:
    """Write `scheduler/scheduler_config.json` (diffusers' DDIMScheduler reads it; so do we)."""
    path = Path(folder) / SCHEDULER_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**noise_schedule.to_scheduler_config(), "_diffusers_version": diffusers.__version__}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def read_scheduler_config(folder: str | Path) -> NoiseScheduleConfig:
    """The noise process recorded in `scheduler/scheduler_config.json`."""
    path = Path(folder) / SCHEDULER_CONFIG
    return NoiseScheduleConfig.from_scheduler_config(read_json(path), source=str(path))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; ValueError naming the file if it is not valid JSON or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def vae_downsampling_factor(path: str | Path) -> int | None:
    """f = 2^(levels - 1) of the VAE at `path` (a folder with config.json, or with vae/config.json), read from
    its config without loading weights; None when `path` is not a local folder (a hub id, or not trained yet)."""
    folder = Path(path)
    for config in (folder / "config.json", folder / "vae" / "config.json"):
        if config.is_file():
            channels = read_json(config).get("block_out_channels")
            if not isinstance(channels, list) or not channels:
                raise ValueError(f"{config}: 'block_out_channels' must be a non-empty list, got {channels!r}")
            return 2 ** (len(channels) - 1)
    return None


def text_positions(folder: Path) -> int:
    """The prompt length the folder's text encoder was built for: its position embeddings, at most CLIP's 77."""
    config = read_json(folder / "text_encoder" / "config.json")
    return min(int(config.get("max_position_embeddings", CLIP_MAX_LENGTH)), CLIP_MAX_LENGTH)


@contextmanager
def loading(folder: Path, component: str, variant: str | None = None) -> Iterator[None]:
    """Re-raise a failure to load `component` as an OSError that names the folder and the component (and, when
    the component holds only variant weights such as `*.fp16.safetensors`, the variant to ask for)."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # what the loaders raise for corrupt files
        hint = ""
        variants = sorted({p.suffixes[-2][1:] for p in (folder / component).glob("*.*.safetensors")})
        if variant is None and variants:
            hint = f"; its weights are variant {', '.join(map(repr, variants))}: pass variant={variants[0]!r}"
        raise OSError(
            f"{folder}: component {component!r} cannot be loaded ({type(err).__name__}: {err}){hint}"
        ) from err
