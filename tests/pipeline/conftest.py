"""Fixtures: one torch thread, the tiny pipeline and its saved folder (built once per session)."""

from pathlib import Path

import pytest
import torch

from ldm.pipeline import LatentDiffusionPipeline
from tests.pipeline.tiny_models import tiny_pipeline


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pipe() -> LatentDiffusionPipeline:
    """The tiny random pipeline (SD noise schedule, default SamplingDefaults); tests must not modify it."""
    return tiny_pipeline()


@pytest.fixture(scope="session")
def model_folder(pipe, tmp_path_factory) -> Path:
    """`pipe` saved with save_pretrained; tests must not modify it (copy it first)."""
    return pipe.save_pretrained(tmp_path_factory.mktemp("tiny-model"))
