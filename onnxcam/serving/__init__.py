"""The embeddable explanation server (the `serve` extra): an ASGI application, its micro-batcher and web page."""

from .app import create_app, run, serving

__all__ = ["create_app", "run", "serving"]
