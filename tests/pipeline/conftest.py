"""Fixtures: one torch thread, the tiny pipeline and its saved folder (built once per session)."""

from pathlib import Path

import pytest

from ldm.generation import LatentDiffusionPipeline
from tests.pipeline.tiny_models import tiny_pipeline


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def pipe() -> LatentDiffusionPipeline:
    """The tiny random pipeline (SD noise schedule, default SamplingDefaults); tests must not modify it."""
    return tiny_pipeline()


@pytest.fixture(scope="session")
def model_folder(pipe, tmp_path_factory) -> Path:
    """`pipe` saved with save_pretrained; tests must not modify it (copy it first)."""
    return pipe.save_pretrained(tmp_path_factory.mktemp("tiny-model"))
