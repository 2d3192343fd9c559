"""`ldm serve`: a web page and an HTTP API for one model folder (see `ldm.serve.app`)."""

from ldm.serve.app import create_app
from ldm.serve.background import serve_in_background
from ldm.serve.requests import ServeLimits

__all__ = ["ServeLimits", "create_app", "serve_in_background"]
