"""A real server for the tests: the app of a tiny random pipeline, served by uvicorn on a free localhost port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from ldm.serve import ServeLimits, create_app, serve_in_background
from tests.pipeline.tiny_models import tiny_pipeline


@pytest.fixture(scope="module")
def tiny_app() -> FastAPI:
    """The app of a tiny random pipeline (16x16 images) with the default limits."""
    return create_app(tiny_pipeline(), ServeLimits())


@pytest.fixture(scope="module")
def server_url(tiny_app: FastAPI) -> Iterator[str]:
    """The base URL of `tiny_app`, served for the test module."""
    with serve_in_background(tiny_app) as url:
        yield url
